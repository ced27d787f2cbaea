"""Multimodal samples: interleaved text, images and time series from JSONL or Parquet (scimoe/data/records.py;
Parquet and `data.streaming=true` through HF `datasets`), validated, tokenized with placeholders and packed.

Tested by `python -m pytest tests/data/test_multimodal.py`. A record is `{"segments": [...]}` with items
- `{"type": "text", "text": "..."}`
- `{"type": "image", "path": "a.png"}` or `{"type": "image", "bytes": "<base64>"}`
- `{"type": "time_series", "values": [[...], ...] (length × channels, or a flat list), "sampling_rate": Hz,
  "channels": ["x", "y"]}` or with `"path"` to a .npy, .csv (header row allowed) or .parquet file.
An image becomes `image_token_count` `<|image_pad|>` tokens at its native size (multiples of 32 pixels),
a series `ts_token_count` `<|ts_pad|>` tokens. A record that fails (not JSON, no segments, unreadable or
empty image, NaN/Inf, wrong dimensions, empty text, sampling rate ≤ 0, too long for a row) is skipped and
reported as `file:line: why`; more than `data.max_bad_fraction` of them stops the run. A document longer than
what is left of a row is split between its items (never inside an image's or a series' tokens; the rest
continues in the next row as a new segment), an item longer than a whole row is skipped and counted
(scimoe/data/packing.py); positions restart per segment, labels are the next token with −100 where that
token is a placeholder, across documents and on padding.
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

from scimoe.config import ConfigError
from scimoe.data.packing import Document, PackedRows, PackReport, pack
from scimoe.data.records import BadRecord, check_bad_share, read_records
from scimoe.data.tokenizer import EOS, tokenizer_for_run
from scimoe.model.timeseries import ts_stride, ts_token_count
from scimoe.model.vision import image_token_count, native_size

log = logging.getLogger("scimoe")
MEAN, STD = 0.5, 0.5  # image normalisation to [-1, 1]


@dataclass
class Sample:
    """One multimodal record, decoded."""

    parts: list[tuple[str, object]] = field(default_factory=list)
    """(kind, payload) in order: ("text", str), ("image", [3, H, W] tensor), ("time_series", (values, rate))."""

    @property
    def images(self) -> list[torch.Tensor]:
        return [p for kind, p in self.parts if kind == "image"]

    @property
    def series(self) -> list[tuple[torch.Tensor, float]]:
        return [p for kind, p in self.parts if kind == "time_series"]


def load_image(item: dict, base_dir: str, vision=None) -> torch.Tensor:
    """The image resized to its native size within `vision`'s pixel budget (model.vision), normalised to [−1, 1]."""
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
    budget = {} if vision is None else {"min_pixels": vision.min_pixels, "max_pixels": vision.max_pixels}
    try:
        h, w = native_size(image.height, image.width, **budget)
    except ValueError as err:
        raise BadRecord(str(err)) from err
    pixels = np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    return (torch.from_numpy(pixels).permute(2, 0, 1) - MEAN) / STD


def load_series(item: dict, base_dir: str, timeseries=None) -> tuple[torch.Tensor, float]:
    """The series standardised per channel over its whole length, then cut to model.timeseries.max_samples
    (LMDeploy's preprocessing, in its order),
    with its sampling rate; one too short to make a token is refused."""
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
    # standardised over the whole series, then cut (the order of LMDeploy's Intern-S1-Pro preprocessing)
    values = (values - values.mean(axis=0, keepdims=True)) / (values.std(axis=0, keepdims=True) + 1e-8)
    if timeseries is not None:
        values = values[: timeseries.max_samples]
    if ts_token_count(values.shape[0], float(rate)) < 1:
        raise BadRecord(f"time series of {values.shape[0]} samples at {rate} Hz is shorter than one token "
                        f"({2 * ts_stride(float(rate)) + 1} samples)")
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), float(rate)


def _has_header(path: str) -> int:
    with open(path) as f:
        first = f.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        return 0
    except ValueError:
        return 1


def parse_record(record: object, base_dir: str, model=None) -> Sample:
    """A record's segments decoded (images resized to their native size, series checked)."""
    if isinstance(record, dict) and isinstance(record.get("segments"), str):  # Parquet may hold them as JSON text
        try:
            record = dict(record, segments=json.loads(record["segments"]))
        except ValueError as err:
            raise BadRecord(f"segments are not JSON: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("segments"), list) or not record["segments"]:
        raise BadRecord("no 'segments' list")
    sample = Sample()
    for i, item in enumerate(record["segments"]):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str) or not item["text"].strip():
                raise BadRecord(f"segments[{i}]: empty text")
            sample.parts.append(("text", item["text"]))
        elif kind == "image":
            sample.parts.append(("image", load_image(item, base_dir, model.vision if model else None)))
        elif kind == "time_series":
            sample.parts.append(("time_series", load_series(item, base_dir, model.timeseries if model else None)))
        else:
            raise BadRecord(f"segments[{i}]: unknown type {kind!r}")
    return sample


def read_samples(path: str, bad: list[str], streaming: bool = False, model=None) -> list[Sample]:
    """Every good record of a .jsonl or .parquet file (scimoe/data/records.py), decoded for `model` (model.*
    sizes; None: the defaults); bad ones go to `bad`."""
    base = os.path.dirname(os.path.abspath(path))
    return read_records(path, lambda record: parse_record(record, base, model), bad, streaming)


def tokenize_sample(sample: Sample, tok, image_id: int, ts_id: int, tokens: dict[str, int],
                    media: list | None = None) -> list[int]:
    """Text tokens, and per image / series as many placeholder ids as the encoder will produce vectors;
    `tokens` counts them by modality, `media` receives each item's (start, end, kind) token span."""
    ids: list[int] = []
    for kind, payload in sample.parts:
        if kind == "text":
            piece = tok.encode(payload).ids
        elif kind == "image":
            piece = [image_id] * image_token_count(payload.shape[1], payload.shape[2])
        else:
            values, rate = payload
            piece = [ts_id] * ts_token_count(values.shape[0], rate)
        tokens[kind] += len(piece)
        if kind != "text" and media is not None:
            media.append((len(ids), len(ids) + len(piece), kind))
        ids.extend(piece)
    return ids


def multimodal_rows(cfg, run_dir: str) -> PackedRows:
    """The `multimodal` data source: `data.path` (.jsonl or .parquet records)."""
    if not cfg.data.path:
        raise ConfigError("config error at 'data.path': the multimodal source needs a .jsonl or .parquet file "
                          "(data=demo_mm trains on the bundled demo set instead)")
    bad: list[str] = []
    samples = read_samples(cfg.data.path, bad, cfg.data.streaming, cfg.model)
    check_bad_share(bad, len(samples), cfg.data.max_bad_fraction, "data.max_bad_fraction", cfg.data.path)
    tok = tokenizer_for_run(cfg, run_dir, lambda: [p for s in samples for kind, p in s.parts if kind == "text"])
    m = cfg.model
    eos = tok.token_to_id(EOS)
    placeholders = {m.image_token_id, m.ts_token_id}
    tokens = {"text": 0, "image": 0, "time_series": 0}
    docs = []
    for i, sample in enumerate(samples):
        media: list = []
        ids = tokenize_sample(sample, tok, m.image_token_id, m.ts_token_id, tokens, media) + [eos]
        docs.append(Document(ids, [t not in placeholders for t in ids], sample.images, sample.series,
                             where=f"{cfg.data.path}: document {i + 1}", media=media))
    report = PackReport()
    rows = pack(docs, cfg.train.seq_len, eos, "split", report)  # split between items, never inside one
    for line in report.skipped_items[:20]:
        log.warning("skipped %s", line)
    log.info("multimodal data: %d documents in %d rows; tokens %s; %d bad records, %d items longer than a row",
             report.documents, len(rows), tokens, len(bad), len(report.skipped_items))
    return rows
