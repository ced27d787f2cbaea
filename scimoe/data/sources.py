"""Which function builds the packed rows for `data.source` (through the registry's allow-list).

Tested by `python -m pytest tests/data/test_text_data.py tests/test_config.py`.
"""
from __future__ import annotations

from typing import Callable

from scimoe.data.packing import PackedRows
from scimoe.registry import resolve_target

SOURCES = {"text": "scimoe.data.text.text_rows", "synthetic": "scimoe.data.synthetic.synthetic_rows",
           "sft": "scimoe.data.sft.sft_rows", "multimodal": "scimoe.data.multimodal.multimodal_rows",
           "indexed": "scimoe.data.indexed.indexed_rows", "multimodal_demo": "scimoe.data.demo.demo_rows"}


def data_source(cfg) -> Callable[..., PackedRows]:
    """The function `(cfg, run_dir) -> PackedRows` that `data.source` names (refused by name if none)."""
    return resolve_target(cfg.data.source, "data.source", SOURCES)


def build_rows(cfg, run_dir: str, source: Callable[..., PackedRows] | None = None) -> PackedRows:
    rows = (source or data_source(cfg))(cfg, run_dir)
    if len(rows) == 0:
        raise ValueError(f"data.source '{cfg.data.source}' produced no rows")
    return rows
