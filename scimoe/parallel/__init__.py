"""Parallelism applied to a built model: process groups, TP/PP/EP/DP. The model never imports this."""
