"""Training: the step, optimizer and schedule, checkpoints, metrics, and the recipes."""
