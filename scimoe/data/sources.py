"""Which function builds the packed rows for `data.source` (through the registry's allow-list)."""
from __future__ import annotations

from scimoe.data.packing import PackedRows
from scimoe.registry import resolve_target

SOURCES = {"text": "scimoe.data.text.text_rows", "synthetic": "scimoe.data.synthetic.synthetic_rows",
           "sft": "scimoe.data.sft.sft_rows", "multimodal": "scimoe.data.multimodal.multimodal_rows",
           "indexed": "scimoe.data.indexed.indexed_rows"}


def build_rows(cfg, run_dir: str) -> PackedRows:
    rows = resolve_target(cfg.data.source, "data.source", SOURCES)(cfg, run_dir)
    if len(rows) == 0:
        raise ValueError(f"data.source '{cfg.data.source}' produced no rows")
    return rows
