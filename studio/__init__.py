"""Defect Studio services: dataset store, jobs, configuration, catalog and CLI (no gradio here)."""
