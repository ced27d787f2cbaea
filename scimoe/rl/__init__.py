"""Reinforcement learning with verifiable rewards: sampling, rewards, the GRPO loss and recipe."""
