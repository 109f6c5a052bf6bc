"""Pieces the command-line front end shares (``python -m studio``): progress bars."""
