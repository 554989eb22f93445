"""Experiments that use the pipeline end to end (the small-scale reproduction study)."""
