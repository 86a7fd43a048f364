"""Command-line entry points; ``launch/*.py`` are thin wrappers around them."""
