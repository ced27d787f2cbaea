"""Multimodal samples as WebDataset tar shards: written by `scimoe-preprocess --multimodal`, read sample by sample
from any byte offset, so a run resumes inside a shard without reading what came before.

Tested by `python -m pytest tests/data/test_stream.py`. A shard is a plain tar (the WebDataset convention:
members `KEY.EXT`, a sample's members consecutive): `KEY.json` holds the tokenised document (`tokens`, with
`<|image_pad|>` / `<|ts_pad|>` placeholders and the final EOS; `media`: [start, end, kind, member] per image or
series; `rates`: each series' sampling rate; `where`: the source record, file:line), `KEY.N.png` / `.jpg` / …
the image file as it was given (decoded only when training reads it), `KEY.N.npy` the series (float32, length
× channels). `index.json` beside the shards lists them (name, samples, bytes) and the tokenizer and
vision / time-series sizes the placeholder counts were computed for. Any WebDataset reader can open the
shards (tests/data/test_stream.py reads them with `webdataset`); scimoe reads them itself, because resuming
exactly needs the byte offset of the next sample, which webdataset's pipelines do not expose.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator

FORMAT = "scimoe-multimodal-shards/1"
BLOCK = 512


class ShardError(Exception):
    """A shard that cannot be read past some point (corrupt header, truncated member): the rest is skipped."""


@dataclass
class RawSample:
    """One sample's members as bytes, where it lies, and where the next one starts."""

    shard: str
    key: str
    offset: int
    next_offset: int
    members: dict[str, bytes]
    """Member name without the key (`json`, `0.png`, `1.npy`) → bytes."""

    def name(self, suffix: str) -> str:
        return f"{os.path.basename(self.shard)}:{self.key}.{suffix}"


def write_shards(samples: Iterable[tuple[str, dict[str, bytes]]], out_dir: str, shard_bytes: int,
                 meta: dict) -> dict:
    """Write (key, {suffix: bytes}) samples into shards of about `shard_bytes` each under `out_dir` and the index
    (with `meta` added); returns the index."""
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict] = []
    tar, size, count = None, 0, 0

    def close() -> None:
        if tar is not None:
            tar.close()
            shards[-1].update(samples=count, bytes=os.path.getsize(os.path.join(out_dir, shards[-1]["name"])))

    for key, members in samples:
        if tar is None or size >= shard_bytes:
            close()
            name = f"shard-{len(shards):06d}.tar"
            shards.append({"name": name})
            tar, size, count = tarfile.open(os.path.join(out_dir, name), "w", format=tarfile.USTAR_FORMAT), 0, 0
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
            size += BLOCK + -(-len(data) // BLOCK) * BLOCK
        count += 1
    close()
    index = {"format": FORMAT, "shards": shards, "samples": sum(s["samples"] for s in shards), **meta}
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index


def read_index(path: str) -> dict:
    """The index of the shard folder `path`, checked (a missing or foreign one is refused by name)."""
    where = os.path.join(path, "index.json")
    try:
        with open(where) as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: not a scimoe shard index ({err}); write shards with scimoe-preprocess "
                         "--multimodal") from err
    if index.get("format") != FORMAT:
        raise ValueError(f"{where}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def _header(f, offset: int, shard: str) -> tarfile.TarInfo | None:
    block = f.read(BLOCK)
    if len(block) < BLOCK or block.count(0) == BLOCK:
        return None  # end of archive (two zero blocks, or a file that simply ends)
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:
        raise ShardError(f"{os.path.basename(shard)}: corrupt tar header at byte {offset} ({err})") from err


def read_samples(shard: str, offset: int = 0) -> Iterator[RawSample]:
    """The samples of `shard` from byte `offset` (a sample's start) on; ShardError where it cannot go on."""
    with open(shard, "rb") as f:
        f.seek(offset)
        members: dict[str, bytes] = {}
        key, start, at = None, offset, offset
        while True:
            info = _header(f, at, shard)
            member_key, _, suffix = (info.name.partition(".") if info is not None else (None, "", ""))
            if key is not None and member_key != key:
                yield RawSample(shard, key, start, at, members)
                members, key, start = {}, None, at
            if info is None:
                return
            data = f.read(info.size)
            if len(data) < info.size:
                raise ShardError(f"{os.path.basename(shard)}: member {info.name} truncated ({len(data)} of "
                                 f"{info.size} bytes)")
            f.seek(-(-info.size // BLOCK) * BLOCK - info.size, os.SEEK_CUR)
            key = member_key
            members[suffix] = data
            at += BLOCK + -(-info.size // BLOCK) * BLOCK
