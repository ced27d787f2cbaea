"""Errors that end a run in one line instead of a traceback: `scimoe-train` prints the message and exits with the
error's `exit_code` (a ConfigError, scimoe/config.py, exits 2). Each package raises its own subclass; the entry
point needs only this module. Tested by `python -m pytest tests/test_cli_errors.py tests/train/test_resume_robustness.py`.
"""
from __future__ import annotations


class RunError(Exception):
    """The run cannot go on; the message names the file, key or record and says why."""

    exit_code = 1
