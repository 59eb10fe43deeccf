"""Prompt datasets, templates, benchmark loaders and the synthetic CPU demo task."""
