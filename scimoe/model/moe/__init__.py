"""Mixture-of-experts block: router, balance losses, dispatch, grouped experts."""
