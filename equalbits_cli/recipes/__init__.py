"""Whole workflows built from the library: ``quickstart`` and the ratio ``sweep``."""
