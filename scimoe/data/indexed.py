"""Pretokenized text in Megatron's `.bin/.idx` format, written and read with megatron-core's own
IndexedDatasetBuilder / IndexedDataset, and weighted blending of several such datasets.

Tested by `python -m pytest tests/data/test_indexed.py`. `data.source=indexed` with `data.path=PREFIX`, or
`data.blend=[w1, PREFIX1, w2, PREFIX2, …]`: each dataset's documents are packed into rows (positions
restart per document), then rows are drawn from the datasets in proportion to their weights with
Megatron's BlendedDataset rule (row i goes to the dataset furthest below its share w_d·(i+1)); a dataset
that runs out starts over. The result is deterministic, so the loader's position resumes it exactly.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch

from scimoe.data.packing import PackedRows, pack_documents

log = logging.getLogger("scimoe")


def write_indexed(prefix: str, documents: Iterable[list[int]], vocab_size: int) -> dict[str, float]:
    """Write documents (token id lists) as PREFIX.bin / PREFIX.idx; returns length statistics."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    dtype = np.uint16 if vocab_size <= 65535 else np.int32
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    lengths = []
    for doc in documents:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
        lengths.append(len(doc))
    builder.finalize(get_idx_path(prefix))
    if not lengths:
        raise ValueError(f"{prefix}: no documents to write")
    return {"documents": len(lengths), "tokens": int(sum(lengths)), "min_length": min(lengths),
            "mean_length": float(np.mean(lengths)), "max_length": max(lengths)}


def read_indexed(prefix: str) -> list[list[int]]:
    """Every document of PREFIX.bin/.idx (megatron's IndexedDataset; one sequence per document or several)."""
    import os

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(f"{prefix}{ext}")]
    if missing:
        raise ValueError(f"data.path: cannot read the indexed dataset '{prefix}' (.bin/.idx): {missing} missing")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except (FileNotFoundError, AssertionError, ValueError) as err:
        raise ValueError(f"data.path: cannot read the indexed dataset '{prefix}' (.bin/.idx): {err}") from err
    bounds = dataset.document_indices
    return [np.concatenate([dataset[j] for j in range(bounds[d], bounds[d + 1])]).astype(np.int64).tolist()
            for d in range(len(bounds) - 1)]


def blend_indices(weights: list[float], sizes: list[int], total: int) -> list[tuple[int, int]]:
    """(dataset, row) for each of `total` blended rows (Megatron's error-minimising rule)."""
    norm = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    counts = [0] * len(weights)
    out = []
    for i in range(total):
        d = int(np.argmax(norm * (i + 1) - np.asarray(counts)))
        out.append((d, counts[d] % sizes[d]))
        counts[d] += 1
    return out


def indexed_rows(cfg, run_dir: str) -> PackedRows:
    """The `indexed` data source."""
    spec = list(cfg.data.blend) if cfg.data.blend else [1.0, cfg.data.path]
    if not spec[1::2] or spec[1::2] == [None] or len(spec) % 2:
        raise ValueError("config error at 'data.blend': give [weight, prefix, …] pairs (or data.path=PREFIX)")
    weights, prefixes = [float(w) for w in spec[0::2]], [str(p) for p in spec[1::2]]
    if min(weights) <= 0:
        raise ValueError(f"config error at 'data.blend': weights must be > 0, got {weights}")
    parts = []
    for prefix in prefixes:
        docs = read_indexed(prefix)
        top = max(max(d) for d in docs if d)
        if top >= cfg.model.vocab_size:
            raise ValueError(f"{prefix} holds token id {top}, beyond model.vocab_size ({cfg.model.vocab_size})")
        parts.append(pack_documents(docs, cfg.train.seq_len, pad_id=0))
    total = sum(len(p) for p in parts)
    chosen = blend_indices(weights, [len(p) for p in parts], total)
    rows = PackedRows(*(torch.stack([getattr(parts[d], k)[r] for d, r in chosen])
                        for k in ("input_ids", "positions", "labels")))
    log.info("indexed data: %s → %d rows (%s)", prefixes, len(rows),
             ", ".join(f"{p}: {sum(1 for d, _ in chosen if d == i)}" for i, p in enumerate(prefixes)))
    return rows
