"""One table of data sources: what `data.source` names, and the loader it opens.

Tested by `python -m pytest tests/data/test_text_data.py tests/data/test_stream.py tests/test_config.py`. An entry
is a dotted path (allow-listed by scimoe/registry.py) to either a function `(cfg, run_dir) -> PackedRows`, whose
rows are built at start and served by a StepLoader, or a class that streams by itself
(`(cfg, run_dir, replica, replicas, gather)`, e.g. `shards`). Either way a recipe gets a `Loader`.
"""
from __future__ import annotations

from typing import Callable, Protocol

from scimoe.data.loader import StepLoader
from scimoe.data.packing import PackedRows
from scimoe.registry import resolve_target

SOURCES = {"text": "scimoe.data.text.text_rows", "synthetic": "scimoe.data.synthetic.synthetic_rows",
           "sft": "scimoe.data.sft.sft_rows", "multimodal": "scimoe.data.multimodal.multimodal_rows",
           "indexed": "scimoe.data.indexed.indexed_rows", "multimodal_demo": "scimoe.data.demo.demo_rows",
           "shards": "scimoe.data.stream.StreamLoader"}


class Loader(Protocol):
    """What a recipe reads batches from: resumable, and closed at the end of the run."""

    def next_step(self) -> list[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


def data_source(cfg) -> Callable:
    """What `data.source` names (refused by name if nothing): a rows function or a streaming loader class."""
    return resolve_target(cfg.data.source, "data.source", SOURCES)


def build_rows(cfg, run_dir: str, source: Callable[..., PackedRows] | None = None) -> PackedRows:
    rows = (source or data_source(cfg))(cfg, run_dir)
    if len(rows) == 0:
        raise ValueError(f"data.source '{cfg.data.source}' produced no rows")
    return rows


def open_loader(cfg, run_dir: str, dims, source: Callable | None = None) -> Loader:
    """This rank's loader of `data.source` (or the already resolved `source`) in layout `dims`."""
    source = source or data_source(cfg)
    if isinstance(source, type):  # streams by itself
        return source(cfg, run_dir, dims.groups.data_rank, dims.data_parallel, dims.all_gather_object)
    return StepLoader(build_rows(cfg, run_dir, source), cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seed,
                      dims.groups.data_rank, dims.data_parallel)
