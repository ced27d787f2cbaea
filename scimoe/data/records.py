"""The one reader of record files (JSON Lines, or Parquet through HF datasets) for every data source that has
records: SFT chats, GRPO prompts, multimodal documents.

Tested by `python -m pytest tests/data/test_chat.py tests/data/test_multimodal.py`. A record that cannot be
used (not JSON, or refused by the caller's `parse`) is skipped and reported as `file:line: why`; more than
the allowed share of them stops the run, naming the file and the first bad line. `streaming=True` reads
through HF datasets' streaming mode (no copy in its cache, so a file larger than the disk cache works).
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Iterator, TypeVar

from scimoe.config import ConfigError
from scimoe.errors import RunError

log = logging.getLogger("scimoe")
T = TypeVar("T")


class BadRecord(ValueError):
    """A record that cannot be used (the message says why)."""


class TooManyBadRecords(RunError, ValueError):
    """More of a source's records or samples were bad than its limit allows (the message names the first)."""


def iter_records(path: str, streaming: bool = False) -> Iterator[tuple[int, object]]:
    """(line or row number from 1, record) of a .jsonl or .parquet file; a JSON line that does not parse
    comes as a BadRecord, blank lines not at all."""
    try:
        if path.endswith(".parquet"):
            from datasets import load_dataset

            for i, row in enumerate(load_dataset("parquet", data_files=path, split="train", streaming=streaming)):
                yield i + 1, row
            return
        if streaming:
            from datasets import load_dataset

            lines = (line["text"] for line in load_dataset("text", data_files=path, split="train", streaming=True))
        else:
            lines = open(path, encoding="utf-8")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as err:
                yield number, BadRecord(f"not JSON: {err}")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config error at 'data.path': cannot read {path}: {err}") from err


def read_records(path: str, parse: Callable[[object], T], bad: list[str], streaming: bool = False) -> list[T]:
    """`parse(record)` of every usable record; the others are appended to `bad` as `file:line: why`."""
    out = []
    for number, record in iter_records(path, streaming):
        try:
            if isinstance(record, BadRecord):
                raise record
            out.append(parse(record))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            bad.append(f"{path}:{number}: {err}")
    return out


def check_bad_share(bad: list[str], good: int, limit: float, key: str, path: str) -> None:
    """Report the skipped records; stop when more than `limit` (config key `key`) of them were bad."""
    for line in bad[:20]:
        log.warning("skipped %s", line)
    if len(bad) > 20:
        log.warning("... and %d more bad records", len(bad) - 20)
    total = good + len(bad)
    if total and len(bad) / total > limit:
        raise TooManyBadRecords(f"{len(bad)} of {total} records of {path} are bad (first: {bad[0]}), more than "
                                f"{key}={limit}")
