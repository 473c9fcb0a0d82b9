"""Checkpoint formats, model zoo, downloads and loading."""
