"""scimoe: a training stack for Intern-S1-Pro-class mixture-of-experts models.

Run a tiny CPU pretraining: `scimoe-train model=tiny train.steps=50` (see README.md).
"""
__version__ = "0.1.0"
