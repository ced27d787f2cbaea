"""Hydra configs shipped inside the package."""
