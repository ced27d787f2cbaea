"""Data: tokenizer, text and synthetic sources, packing into document-reset rows, the step loader."""
