"""Multimodal samples: interleaved text, images and time series from JSONL or Parquet, read through HF
`datasets` (local files or streaming), validated, tokenized with placeholders and packed.

Tested by `python -m pytest tests/data/test_multimodal.py`. A record is `{"segments": [...]}` with items
- `{"type": "text", "text": "..."}`
- `{"type": "image", "path": "a.png"}` or `{"type": "image", "bytes": "<base64>"}`
- `{"type": "time_series", "values": [[...], ...] (length × channels, or a flat list), "sampling_rate": Hz,
  "channels": ["x", "y"]}` or with `"path"` to a .npy, .csv (header row allowed) or .parquet file.
An image becomes `image_token_count` `<|image_pad|>` tokens at its native size (multiples of 32 pixels),
a series `ts_token_count` `<|ts_pad|>` tokens. A record that fails (not JSON, no segments, unreadable or
empty image, NaN/Inf, wrong dimensions, empty text, sampling rate ≤ 0, too long for a row) is skipped and
reported as `file:line: why`; more than `data.max_bad_fraction` of them stops the run. Documents are packed
whole (never split, so an image's tokens stay in one row), positions restart per document, labels are the
next token with −100 where that token is a placeholder, across documents and on padding.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from scimoe.data.tokenizer import EOS, load_tokenizer, train_bpe, run_tokenizer_path
from scimoe.model.timeseries import ts_token_count
from scimoe.model.vision import image_token_count, native_size

log = logging.getLogger("scimoe")
MEAN, STD = 0.5, 0.5  # image normalisation to [-1, 1]


class BadRecord(ValueError):
    """A record that cannot be used (the message says why)."""


@dataclass
class Document:
    parts: list[tuple[str, object]] = field(default_factory=list)
    """(kind, payload) in order: ("text", str), ("image", [3, H, W] tensor), ("time_series", (values, rate))."""

    @property
    def images(self) -> list[torch.Tensor]:
        return [p for kind, p in self.parts if kind == "image"]

    @property
    def series(self) -> list[tuple[torch.Tensor, float]]:
        return [p for kind, p in self.parts if kind == "time_series"]


@dataclass
class DataReport:
    documents: int = 0
    bad: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=lambda: {"text": 0, "image": 0, "time_series": 0})


def load_image(item: dict, base_dir: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        if "bytes" in item:
            data = item["bytes"] if isinstance(item["bytes"], bytes) else base64.b64decode(item["bytes"])
            image = Image.open(io.BytesIO(data))
        elif "path" in item:
            image = Image.open(os.path.join(base_dir, item["path"]))
        else:
            raise BadRecord("image without path or bytes")
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise BadRecord(f"unreadable image: {err}") from err
    if image.width < 1 or image.height < 1:
        raise BadRecord("empty image")
    h, w = native_size(image.height, image.width)
    pixels = np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    return (torch.from_numpy(pixels).permute(2, 0, 1) - MEAN) / STD


def load_series(item: dict, base_dir: str) -> tuple[torch.Tensor, float]:
    rate = item.get("sampling_rate")
    if not isinstance(rate, (int, float)) or not rate > 0:
        raise BadRecord(f"sampling_rate must be a number > 0, got {rate!r}")
    if "values" in item:
        try:
            values = np.asarray(item["values"], dtype=np.float32)
        except (ValueError, TypeError) as err:
            raise BadRecord(f"time series values are not a numeric array: {err}") from err
    elif "path" in item:
        path = os.path.join(base_dir, item["path"])
        try:
            if path.endswith(".npy"):
                values = np.load(path).astype(np.float32)
            elif path.endswith(".csv"):
                values = np.genfromtxt(path, delimiter=",", dtype=np.float32, skip_header=_has_header(path))
            elif path.endswith(".parquet"):
                import pyarrow.parquet as pq

                table = pq.read_table(path)
                values = np.stack([table.column(i).to_numpy().astype(np.float32) for i in range(table.num_columns)], 1)
            else:
                raise BadRecord(f"time series file {item['path']}: .npy, .csv or .parquet expected")
        except (OSError, ValueError) as err:
            raise BadRecord(f"unreadable time series {item['path']}: {err}") from err
    else:
        raise BadRecord("time series without values or path")
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise BadRecord(f"time series must be length × channels, got shape {list(values.shape)}")
    if not np.isfinite(values).all():
        raise BadRecord("time series has NaN or Inf values")
    names = item.get("channels")
    if names is not None and len(names) != values.shape[1]:
        raise BadRecord(f"{len(names)} channel names for {values.shape[1]} channels")
    return torch.from_numpy(np.ascontiguousarray(values)), float(rate)


def _has_header(path: str) -> int:
    with open(path) as f:
        first = f.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        return 0
    except ValueError:
        return 1


def parse_record(record: object, base_dir: str) -> Document:
    if not isinstance(record, dict) or not isinstance(record.get("segments"), list) or not record["segments"]:
        raise BadRecord("no 'segments' list")
    doc = Document()
    for i, item in enumerate(record["segments"]):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str) or not item["text"].strip():
                raise BadRecord(f"segments[{i}]: empty text")
            doc.parts.append(("text", item["text"]))
        elif kind == "image":
            doc.parts.append(("image", load_image(item, base_dir)))
        elif kind == "time_series":
            doc.parts.append(("time_series", load_series(item, base_dir)))
        else:
            raise BadRecord(f"segments[{i}]: unknown type {kind!r}")
    return doc


def read_records(path: str, streaming: bool, report: DataReport) -> list[Document]:
    """Every good record of a .jsonl or .parquet file, through HF datasets; bad ones go to the report."""
    from datasets import load_dataset

    base = os.path.dirname(os.path.abspath(path))
    if path.endswith(".parquet"):
        rows = ((i + 1, row) for i, row in enumerate(load_dataset("parquet", data_files=path, split="train",
                                                                   streaming=streaming)))
    else:  # JSON Lines: read as text lines so one broken line costs one record, not the file
        lines = load_dataset("text", data_files=path, split="train", streaming=streaming)
        rows = ((i + 1, line["text"]) for i, line in enumerate(lines))
    docs = []
    for number, raw in rows:
        try:
            if isinstance(raw, str):
                if not raw.strip():
                    continue
                try:
                    raw = json.loads(raw)
                except ValueError as err:
                    raise BadRecord(f"not JSON: {err}") from err
            elif isinstance(raw.get("segments"), str):  # Parquet columns may hold the segments as JSON text
                raw = dict(raw, segments=json.loads(raw["segments"]))
            docs.append(parse_record(raw, base))
        except BadRecord as err:
            report.bad.append(f"{path}:{number}: {err}")
    return docs


@dataclass
class MultimodalRows:
    """Packed rows plus, per row, its images and series in order of appearance."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    images: list[list[torch.Tensor]]
    series: list[list[tuple[torch.Tensor, float]]]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict:
        picked = index.tolist()
        return {"input_ids": self.input_ids[index], "positions": self.positions[index], "labels": self.labels[index],
                "images": [img for i in picked for img in self.images[i]],
                "series": [s for i in picked for s in self.series[i]]}


def tokenize_document(doc: Document, tok, image_id: int, ts_id: int, window: int, report: DataReport) -> list[int]:
    """Text tokens, and per image / series as many placeholder ids as the encoder will produce vectors."""
    ids: list[int] = []
    for kind, payload in doc.parts:
        if kind == "text":
            piece = tok.encode(payload).ids
        elif kind == "image":
            piece = [image_id] * image_token_count(payload.shape[1], payload.shape[2])
        else:
            values, rate = payload
            piece = [ts_id] * ts_token_count(values.shape[0], rate, window)
        report.tokens[kind] += len(piece)
        ids.extend(piece)
    return ids


def pack_multimodal(docs: list[tuple[list[int], Document]], seq_len: int, pad_id: int, placeholders: set[int],
                    report: DataReport, paths: list[str]) -> MultimodalRows:
    rows: list[tuple[list[int], list[int], list[int]]] = []
    media: list[tuple[list, list]] = []
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []
    images: list = []
    series: list = []

    def close() -> None:
        pad = seq_len - len(ids)
        rows.append((ids + [pad_id] * pad, pos + [0] * pad, lab + [-100] * pad))
        media.append((images, series))

    for (tokens, doc), where in zip(docs, paths):
        if len(tokens) > seq_len:
            report.bad.append(f"{where}: {len(tokens)} tokens do not fit train.seq_len ({seq_len})")
            continue
        if len(ids) + len(tokens) > seq_len:
            close()
            ids, pos, lab, images, series = [], [], [], [], []
        ids += tokens
        pos += range(len(tokens))
        lab += [t if t not in placeholders else -100 for t in tokens[1:]] + [-100]
        images = images + doc.images
        series = series + doc.series
        report.documents += 1
    if ids:
        close()
    if not rows:
        raise ValueError("multimodal data produced no rows")
    return MultimodalRows(*(torch.tensor([r[k] for r in rows]) for k in range(3)),
                          images=[m[0] for m in media], series=[m[1] for m in media])


def multimodal_rows(cfg, run_dir: str) -> MultimodalRows:
    """The `multimodal` data source: `data.path` (.jsonl or .parquet records)."""
    if not cfg.data.path:
        raise ValueError("config error at 'data.path': the multimodal source needs a .jsonl or .parquet file")
    report = DataReport()
    docs = read_records(cfg.data.path, cfg.data.streaming, report)
    total = len(docs) + len(report.bad)
    if total and len(report.bad) / total > cfg.data.max_bad_fraction:
        raise ValueError(f"{len(report.bad)} of {total} records of {cfg.data.path} are bad (first: {report.bad[0]}), "
                         f"more than data.max_bad_fraction={cfg.data.max_bad_fraction}")
    saved = os.path.join(run_dir, "tokenizer.json")
    path = run_tokenizer_path(cfg, run_dir)
    if path:
        tok = load_tokenizer(path, cfg.model.vocab_size)
    else:
        tok = train_bpe([p for d in docs for kind, p in d.parts if kind == "text"], cfg.model.vocab_size)
        os.makedirs(run_dir, exist_ok=True)
        tok.save(f"{saved}.tmp{os.getpid()}")
        os.replace(f"{saved}.tmp{os.getpid()}", saved)
    m = cfg.model
    eos = tok.token_to_id(EOS)
    tokenized = [(tokenize_document(d, tok, m.image_token_id, m.ts_token_id, m.timeseries.window, report) + [eos], d)
                 for d in docs]
    rows = pack_multimodal(tokenized, cfg.train.seq_len, eos, {m.image_token_id, m.ts_token_id}, report,
                           [f"{cfg.data.path}: document {i + 1}" for i in range(len(tokenized))])
    for line in report.bad[:20]:
        log.warning("skipped %s", line)
    log.info("multimodal data: %d documents in %d rows; tokens %s; %d bad records", report.documents, len(rows),
             report.tokens, len(report.bad))
    return rows
