"""Pack token documents into fixed-length rows whose positions restart at 0 for each document.

Tested by `python -m pytest tests/data/test_text_data.py`. Labels are the next token inside the same
document and −100 where there is none (a document's last token, padding), so no loss and no
attention ever crosses a document boundary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """N packed rows of `seq_len` tokens each."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "positions": self.positions[index], "labels": self.labels[index]}


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> PackedRows:
    """Greedily fill rows in document order; a document that overflows a row continues in the next
    row as a new segment (positions from 0). The last row is padded with single-token documents."""
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []
    for doc in docs:
        start = 0
        while start < len(doc):
            room = seq_len - len(ids) % seq_len
            piece = doc[start:start + room]
            ids.extend(piece)
            pos.extend(range(len(piece)))
            lab.extend(piece[1:] + [-100])
            start += len(piece)
    pad = (-len(ids)) % seq_len
    ids.extend([pad_id] * pad)
    pos.extend([0] * pad)
    lab.extend([-100] * pad)
    shape = (-1, seq_len)
    return PackedRows(torch.tensor(ids).view(shape), torch.tensor(pos).view(shape), torch.tensor(lab).view(shape))
