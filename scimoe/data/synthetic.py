"""Synthetic source: documents drawn from a fixed random Markov chain (learnable, no files).

Tested by `python -m pytest tests/data/test_text_data.py`. Each token has four likely successors,
so a model that learns the chain drops its loss from ln(V) towards ln(4).
"""
from __future__ import annotations

import torch

from scimoe.data.packing import PackedRows, pack_documents

SUCCESSORS = 4


def synthetic_rows(cfg, run_dir: str) -> PackedRows:
    """`data.synthetic_rows` packed rows of Markov-chain documents, fixed by `train.seed`."""
    vocab, seq_len = cfg.model.vocab_size, cfg.train.seq_len
    gen = torch.Generator().manual_seed(cfg.train.seed)
    table = torch.randint(1, vocab, (vocab, SUCCESSORS), generator=gen)
    need = cfg.data.synthetic_rows * seq_len
    docs: list[list[int]] = []
    total = 0
    while total < need:
        length = int(torch.randint(8, 2 * seq_len, (1,), generator=gen))
        choice = torch.randint(0, SUCCESSORS, (length,), generator=gen).tolist()
        token = int(torch.randint(1, vocab, (1,), generator=gen))
        doc = []
        for c in choice:
            doc.append(token)
            token = int(table[token, c])
        docs.append(doc)
        total += length
    rows = pack_documents(docs, seq_len, pad_id=0)
    return PackedRows(rows.input_ids[: cfg.data.synthetic_rows], rows.positions[: cfg.data.synthetic_rows],
                      rows.labels[: cfg.data.synthetic_rows])
