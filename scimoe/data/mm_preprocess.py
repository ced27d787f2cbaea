"""`scimoe-preprocess --multimodal`: multimodal records (the JSONL / Parquet of scimoe/data/multimodal.py) into
tar shards that training streams (scimoe/data/tar_shards.py, scimoe/data/stream.py).

Run: `scimoe-preprocess --multimodal samples.jsonl --out data/mm [--tokenizer tok.json | --vocab-size 4096]
[--model tiny_mm] [--override model.vision.max_pixels=65536 …] [--shard-mb 256]`, then train with `scimoe-train model=tiny_mm data=shards data.path=data/mm`.
Tested by `python -m pytest tests/data/test_stream.py`. Every record is checked as training would check it
(images decoded, series checked and standardised); bad ones are skipped and listed as file:line. Text is
tokenised once here; images are stored as the files they were (decoded again in the loader's workers), series
as float32 .npy. Placeholder counts depend on the model's vision and time-series sizes (`--model`), which the
index records and training checks. Without --tokenizer a byte-level BPE is trained on the records' text and
saved as OUT/tokenizer.json.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
from typing import Iterator

import numpy as np
from tqdm import tqdm

from scimoe.data.multimodal import parse_record, tokenize_sample
from scimoe.data.records import BadRecord, iter_records
from scimoe.data.tar_shards import write_shards
from scimoe.data.tokenizer import EOS, load_tokenizer, train_bpe


def _image_bytes(item: dict, base: str) -> tuple[bytes, str]:
    """The image file's own bytes and its extension."""
    from PIL import Image

    if "bytes" in item:
        data = item["bytes"] if isinstance(item["bytes"], bytes) else base64.b64decode(item["bytes"])
    else:
        with open(os.path.join(base, item["path"]), "rb") as f:
            data = f.read()
    kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    return data, {"jpeg": "jpg"}.get(kind, kind)


def _texts(inputs: list[str]) -> Iterator[str]:
    for path in inputs:
        for _, record in iter_records(path):
            for item in record.get("segments", []) if isinstance(record, dict) else []:
                if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                    yield item["text"]


def _samples(inputs: list[str], tok, model, skipped: list[str], progress: bool) -> Iterator[tuple[str, dict]]:
    eos, counted = tok.token_to_id(EOS), {"text": 0, "image": 0, "time_series": 0}
    n = 0
    for path in inputs:
        base = os.path.dirname(os.path.abspath(path))
        for number, record in tqdm(iter_records(path), desc=os.path.basename(path), unit="rec", disable=not progress):
            try:
                if isinstance(record, BadRecord):
                    raise record
                sample = parse_record(record, base, model)
                media: list = []
                tokens = tokenize_sample(sample, tok, model.image_token_id, model.ts_token_id, counted, media) + [eos]
                members: dict[str, bytes] = {}
                items = [item for item in record["segments"] if item.get("type") != "text"]
                spans, rates = [], []
                for k, ((a, b, kind), item) in enumerate(zip(media, items)):
                    if kind == "image":
                        data, ext = _image_bytes(item, base)
                    else:
                        values, rate = sample.series[len(rates)]
                        buffer = io.BytesIO()
                        np.save(buffer, values.numpy())
                        data, ext = buffer.getvalue(), "npy"
                        rates.append(rate)
                    members[f"{k}.{ext}"] = data
                    spans.append([a, b, kind, f"{k}.{ext}"])
            except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
                skipped.append(f"{path}:{number}: {err}")
                continue
            meta = {"tokens": tokens, "media": spans, "rates": rates, "where": f"{path}:{number}"}
            yield f"{n:09d}", {"json": json.dumps(meta).encode(), **members}
            n += 1


def preprocess_multimodal(inputs: list[str], out: str, tokenizer: str | None, vocab_size: int,
                          model_preset: str = "tiny_mm", overrides: list[str] | None = None, shard_mb: float = 256,
                          progress: bool = True) -> dict:
    """Write OUT/shard-*.tar and OUT/index.json; returns a summary (samples, shards, skipped records).
    `overrides`: model.* keys as scimoe-train takes them (the image and series sizes decide placeholder counts)."""
    from scimoe.config import compose_config

    model = compose_config([f"model={model_preset}", *(overrides or [])]).model
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
        return _write(inputs, out, tokenizer, vocab_size, model_preset, model, shard_mb, progress)
    except BaseException:
        if created:  # a failed run leaves no half-written output folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write(inputs: list[str], out: str, tokenizer: str | None, vocab_size: int, model_preset: str, model,
           shard_mb: float, progress: bool) -> dict:
    tok_path = os.path.join(out, "tokenizer.json")
    tok = load_tokenizer(tokenizer, vocab_size, size_key="--vocab-size") if tokenizer else \
        train_bpe(list(_texts(inputs)), vocab_size)
    tok.save(tok_path)
    skipped: list[str] = []
    meta = {"tokenizer": "tokenizer.json", "model": model_preset,
            "vision": {"min_pixels": model.vision.min_pixels, "max_pixels": model.vision.max_pixels},
            "timeseries": {"max_samples": model.timeseries.max_samples}, "sources": inputs}
    index = write_shards(_samples(inputs, tok, model, skipped, progress), out, int(shard_mb * 2**20), meta)
    if not index["samples"]:
        raise ValueError(f"no usable multimodal record in {', '.join(inputs)}: " +
                         (f"{len(skipped)} skipped, the first: {skipped[0]}" if skipped else "no records at all"))
    return {"samples": index["samples"], "shards": len(index["shards"]), "skipped": len(skipped),
            "skipped_records": skipped, "out": out}
