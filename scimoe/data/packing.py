"""The one packer: documents (text, chats, multimodal) into fixed-length rows whose positions restart at 0
for each document, with labels only inside a document.

Tested by `python -m pytest tests/data/test_text_data.py tests/data/test_chat.py tests/data/test_multimodal.py`.
A label is the next token of the same document where that token is trained (`Document.trained`: all tokens
of plain text, assistant tokens of a chat, no modality placeholder), −100 elsewhere, on a document's last
token and on padding, so no loss and no attention ever crosses a document boundary. A document longer than
what is left of the row is handled as `overflow` says: `split` fills the row and continues in the next one
as a new segment (positions from 0), `whole` starts a new row and, when the document is longer than a whole
row, `truncate`s it to its start or `drop`s it (counted either way).

Splitting never cuts inside an image or a series (`Document.media`): a segment ends before the item that does
not fit, and the row is closed early if not even that item fits in what is left; each row carries the images
and series whose placeholders it holds. An item longer than a whole row cannot be placed anywhere: it is
taken out of its document (placeholders and pixels or samples) and counted in `PackReport.skipped_items`.
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
    media: list[tuple[int, int, str]] = field(default_factory=list)
    """(start, end, kind) of each image's or series' placeholder tokens, in order; kind is "image" or
    "time_series". Splitting keeps each span whole."""

    def splittable(self, limit: int, skipped: list[str]) -> "Document":
        """This document ready to be split over rows of `limit` tokens: media spans checked, items longer than a
        row taken out (each named in `skipped`)."""
        if len(self.media) != len(self.images) + len(self.series):
            raise ValueError(f"{self.where}: splitting needs the token span of each image and series (Document.media)")
        return self.without_items_longer_than(limit, skipped)

    def without_items_longer_than(self, limit: int, skipped: list[str]) -> "Document":
        """This document less the media items of more than `limit` tokens (each named in `skipped`)."""
        long = [i for i, (a, b, _) in enumerate(self.media) if b - a > limit]
        if not long:
            return self
        tokens, trained = list(self.tokens), list(self.trained or [True] * len(self.tokens))
        images, series, media, shift = [], [], [], 0
        counters = {"image": iter(self.images), "time_series": iter(self.series)}
        for i, (a, b, kind) in enumerate(self.media):
            payload = next(counters[kind])
            if i in long:
                skipped.append(f"{self.where}: {kind.replace('_', ' ')} {i + 1} of the document has {b - a} "
                               f"tokens, more than train.seq_len ({limit})")
                del tokens[a - shift:b - shift], trained[a - shift:b - shift]
                shift += b - a
                continue
            (images if kind == "image" else series).append(payload)
            media.append((a - shift, b - shift, kind))
        return Document(tokens, trained, images, series, self.where, media)

    def cut_at_or_before(self, end: int) -> int:
        """The last place ≤ `end` where the document may be cut: not inside a media span."""
        for a, b, _ in self.media:
            if a < end < b:
                return a
        return end

    def media_between(self, start: int, end: int) -> tuple[list, list]:
        """(images, series) whose placeholders lie in tokens [start, end)."""
        counters = {"image": iter(self.images), "time_series": iter(self.series)}
        found: dict[str, list] = {"image": [], "time_series": []}
        for a, b, kind in self.media:
            payload = next(counters[kind])
            if start <= a and b <= end:
                found[kind].append(payload)
        return found["image"], found["time_series"]


@dataclass
class PackReport:
    documents: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    """`where: why` of each dropped document."""
    skipped_items: list[str] = field(default_factory=list)
    """`where: why` of each image or series taken out of its document because no row can hold it."""
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


class RowFiller:
    """One row being filled: documents (or their continuations) go in until it is full, then `close` pads it.
    The packer below and the streamed loader (scimoe/data/stream.py) share it."""

    def __init__(self, seq_len: int, pad_id: int, report: PackReport) -> None:
        self.seq_len, self.pad_id, self.report = seq_len, pad_id, report
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.lab: list[int] = []
        self.images: list = []
        self.series: list = []
        self.full = False

    def add(self, tokens: list[int], trained: list[bool]) -> None:
        self.ids.extend(tokens)
        self.pos.extend(range(len(tokens)))
        self.lab.extend([t if ok else -100 for t, ok in zip(tokens[1:], trained[1:])] + [-100])
        self.report.tokens += len(tokens)
        self.report.trained_tokens += sum(trained[1:])
        self.full = len(self.ids) == self.seq_len

    def take(self, doc: Document, start: int) -> int:
        """Tokens [start, end) of `doc` into the row, cut only where `doc` may be cut; returns end (the row is then
        full, or the document is done). The row closes early when the next image or series does not fit."""
        tokens, trained = doc.tokens, doc.trained or [True] * len(doc.tokens)
        end = min(len(tokens), start + self.seq_len - len(self.ids))
        end = doc.cut_at_or_before(end) if end < len(tokens) else end
        if end == start:  # the next image or series does not fit in what is left of this row
            assert self.ids, "an item longer than a row was not taken out"
            self.full = True
            return start
        self.add(tokens[start:end], trained[start:end])
        more_images, more_series = doc.media_between(start, end)
        self.images, self.series = self.images + more_images, self.series + more_series
        return end

    def close(self) -> tuple[list[int], list[int], list[int], list, list]:
        """(input ids, positions, labels, images, series) of the row, padded to seq_len."""
        pad = self.seq_len - len(self.ids)
        return (self.ids + [self.pad_id] * pad, self.pos + [0] * pad, self.lab + [-100] * pad, self.images,
                self.series)


def pack(docs: list[Document], seq_len: int, pad_id: int, overflow: str = "split",
         report: PackReport | None = None) -> PackedRows:
    """Pack `docs` in order (see the module docstring for `overflow`)."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got '{overflow}'")
    report = report if report is not None else PackReport()
    with_media = any(d.images or d.series for d in docs)
    rows: list[tuple[list[int], list[int], list[int], list, list]] = []
    row = RowFiller(seq_len, pad_id, report)

    def close_row() -> None:
        nonlocal row
        rows.append(row.close())
        row = RowFiller(seq_len, pad_id, report)

    for doc in docs:
        if overflow == "truncate" and doc.media:
            raise ValueError(f"{doc.where}: a document with images or series cannot be truncated; use split or drop")
        if overflow == "split":
            doc = doc.splittable(seq_len, report.skipped_items)
        tokens, trained = doc.tokens, doc.trained or [True] * len(doc.tokens)
        if not tokens:
            continue
        if overflow == "split":
            start = 0
            while start < len(tokens):
                start = row.take(doc, start)
                if row.full:
                    close_row()
        else:
            if len(tokens) > seq_len:
                if overflow == "drop":
                    report.dropped.append(f"{doc.where}: {len(tokens)} tokens do not fit train.seq_len ({seq_len})")
                    continue
                tokens, trained = tokens[:seq_len], trained[:seq_len]
                report.truncated += 1
            if len(row.ids) + len(tokens) > seq_len:
                close_row()
            row.add(tokens, trained)
            row.images, row.series = row.images + doc.images, row.series + doc.series
            row.full = False  # a whole document may fill the row; the next one closes it
        report.documents += 1
    if row.ids:
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
