"""Datasets for comm: loading (hub name or local files), tokenisation, collation, synthetic tasks."""
