"""The one packer: documents (text, chats, multimodal) into fixed-length rows whose positions restart at 0
for each document, with labels only inside a document.

Tested by `python -m pytest tests/data/test_text_data.py tests/data/test_chat.py tests/data/test_multimodal.py`.
A label is the next token of the same document where that token is trained (`Document.trained`: all tokens
of plain text, assistant tokens of a chat, no modality placeholder), −100 elsewhere, on a document's last
token and on padding, so no loss and no attention ever crosses a document boundary. A document longer than
what is left of the row is handled as `overflow` says: `split` fills the row and continues in the next one
as a new segment (positions from 0; plain text), `whole` starts a new row and, when the document is longer
than a whole row, `truncate`s it to its start or `drop`s it (counted either way).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

OVERFLOW = ("split", "truncate", "drop")


@dataclass
class Document:
    """One document's tokens, and what travels with them."""

    tokens: list[int]
    trained: list[bool] | None = None
    """Per token: whether it is a loss target (None: every token)."""
    images: list = field(default_factory=list)
    """[3, H, W] tensors, in order of their placeholders."""
    series: list = field(default_factory=list)
    """(values [L, C], sampling rate) pairs, in order of their placeholders."""
    where: str = ""
    """Where it came from, for reports (`file: document 7`)."""


@dataclass
class PackReport:
    documents: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    """`where: why` of each dropped document."""
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class PackedRows:
    """N packed rows of `seq_len` tokens each, plus (multimodal) each row's images and series in order."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    images: list[list] | None = None
    series: list[list] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict:
        batch = {"input_ids": self.input_ids[index], "positions": self.positions[index], "labels": self.labels[index]}
        if self.images is not None:
            picked = index.tolist()
            batch["images"] = [img for i in picked for img in self.images[i]]
            batch["series"] = [s for i in picked for s in self.series[i]]
        return batch


def pack(docs: list[Document], seq_len: int, pad_id: int, overflow: str = "split",
         report: PackReport | None = None) -> PackedRows:
    """Pack `docs` in order (see the module docstring for `overflow`)."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got '{overflow}'")
    report = report if report is not None else PackReport()
    with_media = any(d.images or d.series for d in docs)
    rows: list[tuple[list[int], list[int], list[int], list, list]] = []
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []
    images: list = []
    series: list = []

    def close_row() -> None:
        nonlocal ids, pos, lab, images, series
        pad = seq_len - len(ids)
        rows.append((ids + [pad_id] * pad, pos + [0] * pad, lab + [-100] * pad, images, series))
        ids, pos, lab, images, series = [], [], [], [], []

    def add(tokens: list[int], trained: list[bool]) -> None:
        ids.extend(tokens)
        pos.extend(range(len(tokens)))
        lab.extend([t if ok else -100 for t, ok in zip(tokens[1:], trained[1:])] + [-100])
        report.tokens += len(tokens)
        report.trained_tokens += sum(trained[1:])

    for doc in docs:
        tokens, trained = doc.tokens, doc.trained or [True] * len(doc.tokens)
        if not tokens:
            continue
        if overflow == "split":
            start = 0
            while start < len(tokens):
                room = seq_len - len(ids)
                add(tokens[start:start + room], trained[start:start + room])
                start += room
                if len(ids) == seq_len:
                    close_row()
        else:
            if len(tokens) > seq_len:
                if overflow == "drop":
                    report.dropped.append(f"{doc.where}: {len(tokens)} tokens do not fit train.seq_len ({seq_len})")
                    continue
                tokens, trained = tokens[:seq_len], trained[:seq_len]
                report.truncated += 1
            if len(ids) + len(tokens) > seq_len:
                close_row()
            add(tokens, trained)
        images, series = images + doc.images, series + doc.series
        report.documents += 1
    if ids:
        close_row()
    if not rows:
        raise ValueError("packing produced no rows (every document was dropped or empty)")
    tensors = [torch.tensor([r[k] for r in rows]) for k in range(3)]
    if not with_media:
        return PackedRows(*tensors)
    return PackedRows(*tensors, images=[r[3] for r in rows], series=[r[4] for r in rows])


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> PackedRows:
    """Plain token documents, split across rows where they overflow (text corpora, synthetic data)."""
    return pack([Document(d) for d in docs], seq_len, pad_id, "split")
