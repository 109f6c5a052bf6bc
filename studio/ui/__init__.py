"""Gradio tabs, one file each. The only package that imports gradio."""
