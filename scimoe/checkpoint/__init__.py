"""Checkpoint storage, shared by training (scimoe/train) and conversion (scimoe/convert):

- `storage`: the folder protocol (atomic saves, markers, SHA manifests, what to resume, pruning);
- `contents`: what the files hold (every rank's model and optimizer slices, the train state) and loading them into
  any layout;
- `shards`: slices tagged with their place in the single-process tensors, and reading them back;
- `async_save`: writing a checkpoint's files in the background;
- `hf_layout` and `hf_index`: the released Hugging Face names and config.json, and reading such a folder lazily.

Tested by `python -m pytest tests/train/test_checkpoint.py tests/train/test_resume_robustness.py tests/train/test_hf_export.py`.
"""
