"""Readers of the field's public measurement databases (optional dependencies; run once, write plain data)."""
