"""Conversions between scimoe checkpoints and other formats (Hugging Face folders)."""
