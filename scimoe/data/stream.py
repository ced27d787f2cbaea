"""Streamed multimodal data (`data.source=shards`): tar shards read lazily, media decoded in worker processes,
sources blended by weight, and an exact per-rank resume without re-reading earlier shards.

Tested by `python -m pytest tests/data/test_stream.py` (resume, blends, bad shards and members, flat memory over
a data set larger than the memory it is given). Each data-parallel replica (world / (tp·pp·cp) of them; the
tp, pp and cp ranks of one replica read the same rows) reads its own shards of every source (shard i goes to
replica i mod replicas), in a seeded order per epoch, sample after sample from the byte where it stopped.
Samples go to a pool of `data.workers` processes to be decoded (images to their native size, series as
stored), at most `data.prefetch` per source in flight, and come back in order; the main process packs them into
rows with the packer of scimoe/data/packing.py (documents longer than a row split between items, an item longer
than a row skipped and counted). Each row comes from one source, drawn by weight from a generator seeded by
(train.seed, replica, row number), so the sequence of rows is a function of the data and the seed alone.

The state after each row is, per source, the sample where the next row begins (epoch, shard, byte offset) and
how many of its tokens earlier rows took, plus the row count: resuming seeks there directly. The checkpoint
keeps every replica's state; resuming needs the same number of replicas (tp, pp, cp may change). A shard that
cannot be read on (corrupt header, truncated member) loses its remaining samples; a sample whose image or series
does not decode is skipped; both are counted and named (shard and member), and more than
`data.max_bad_fraction` of the samples read stops the run.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections import deque
from types import SimpleNamespace

import numpy as np
import torch

from scimoe.config import ConfigError
from scimoe.data.multimodal import load_image
from scimoe.data.packing import Document, PackReport, RowFiller
from scimoe.data.records import BadRecord, TooManyBadRecords
from scimoe.data.tar_shards import RawSample, ShardError, read_index, read_samples
from scimoe.data.tokenizer import EOS, load_tokenizer
from scimoe.model.timeseries import ts_token_count
from scimoe.model.vision import image_token_count

log = logging.getLogger("scimoe")


def decode_sample(raw: RawSample, seq_len: int, vision: dict, placeholders: tuple[int, int]):
    """In a worker: (Document or None, why it is bad or None, items skipped as longer than a row)."""
    try:
        meta = json.loads(raw.members["json"])
        images, series, media, rates = [], [], [], iter(meta["rates"])
        for a, b, kind, member in meta["media"]:
            if member not in raw.members:
                raise BadRecord(f"member {member} missing")
            data = raw.members[member]
            if kind == "image":
                try:
                    image = load_image({"bytes": data}, "", SimpleNamespace(**vision))
                except BadRecord as err:
                    raise BadRecord(f"member {member}: {err}") from err
                made = image_token_count(image.shape[1], image.shape[2])
                images.append(image)
            else:
                try:
                    values = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
                except ValueError as err:
                    raise BadRecord(f"member {member}: unreadable series ({err})") from err
                rate = float(next(rates))
                made = ts_token_count(values.shape[0], rate) if values.ndim == 2 else -1
                if not bool(torch.isfinite(values).all()):
                    raise BadRecord(f"member {member}: series has NaN or Inf values")
                series.append((values, rate))
            if made != b - a:
                raise BadRecord(f"member {member}: makes {made} tokens, the shard has {b - a} placeholders (written "
                                "for other model.vision / model.timeseries sizes?)")
            media.append((a, b, kind))
        tokens = meta["tokens"]
    except (BadRecord, KeyError, ValueError, TypeError, StopIteration) as err:
        return None, f"{raw.name('json').rsplit('.', 1)[0]}: {err}", []
    doc = Document(tokens, [t not in placeholders for t in tokens], images, series,
                   f"{raw.name('json').rsplit('.', 1)[0]} ({meta.get('where', '?')})", media)
    skipped: list[str] = []
    return doc.splittable(seq_len, skipped), None, skipped


def _die_with_parent(parent: int) -> None:
    """Decode-worker initializer: the kernel kills this worker when the training process dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG; elsewhere the pool's own shutdown is all there is)."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


class _Inline:
    """An executor that runs each task when submitted (data.workers=0)."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class BadCount:
    """Samples read and the bad ones among them (named), checked against data.max_bad_fraction."""

    def __init__(self, limit: float) -> None:
        self.limit, self.seen, self.bad, self.skipped_items = limit, 0, [], []

    def add(self, why: str) -> None:
        self.bad.append(why)
        if len(self.bad) <= 20:
            log.warning("skipped %s", why)
        if self.seen >= 20 and len(self.bad) / self.seen > self.limit:
            raise TooManyBadRecords(f"{len(self.bad)} of {self.seen} streamed samples are bad (first: {self.bad[0]}), "
                                    f"more than data.max_bad_fraction={self.limit}")


class SourceStream:
    """One shard folder as this replica reads it: documents in order from a cursor, rows packed from them."""

    def __init__(self, path: str, number: int, replica: int, replicas: int, seed: int, decode_args: tuple,
                 pool, prefetch: int, bad: BadCount) -> None:
        self.path, self.number, self.seed, self.decode_args = path, number, seed, decode_args
        self.pool, self.prefetch, self.bad = pool, prefetch, bad
        self.index = read_index(path)
        names = [s["name"] for s in self.index["shards"]]
        self.mine = names[replica::replicas]
        if len(names) < replicas:
            raise ConfigError(f"config error at 'data.path': {path} has {len(names)} shards, fewer than the "
                              f"{replicas} data-parallel replicas (write smaller shards: scimoe-preprocess --shard-mb)")
        self.cursor = {"epoch": 0, "shard": 0, "offset": 0, "token": 0}
        self._docs = None
        self.rows = 0
        """Rows this source gave since the loader started (not saved)."""

    def order(self, epoch: int) -> list[str]:
        picked = torch.randperm(len(self.mine), generator=torch.Generator().manual_seed(
            self.seed * 1000003 + self.number * 7919 + epoch))
        return [self.mine[i] for i in picked]

    def _raw(self, epoch: int, position: int, offset: int):
        """(cursor of the sample, cursor after it, raw sample) from the given place on, epoch after epoch."""
        while True:
            whole_epoch, read_any, order = position == 0 and offset == 0, False, self.order(epoch)
            for position in range(position, len(order)):
                shard = os.path.join(self.path, order[position])
                try:
                    for raw in read_samples(shard, offset):
                        read_any = True
                        yield (epoch, position, raw.offset), (epoch, position, raw.next_offset), raw
                except ShardError as err:
                    self.bad.seen += 1
                    self.bad.add(f"{err}; the rest of the shard is skipped")
                except OSError as err:
                    self.bad.seen += 1
                    self.bad.add(f"{shard}: {err}")
                offset = 0
            if whole_epoch and not read_any:
                raise ValueError(f"data.path {self.path}: no sample could be read from this replica's shards")
            epoch, position = epoch + 1, 0

    def _documents(self):
        c = self.cursor
        raws = self._raw(c["epoch"], c["shard"], c["offset"])
        window: deque = deque()
        while True:
            while len(window) < self.prefetch:
                at, after, raw = next(raws)
                window.append((at, after, self.pool.submit(decode_sample, raw, *self.decode_args)))
            at, after, future = window.popleft()
            doc, why, skipped = future.result()
            self.bad.seen += 1
            if why:
                self.bad.add(why)
                continue
            for line in skipped:
                if line not in self.bad.skipped_items:  # named once, however many epochs meet it
                    self.bad.skipped_items.append(line)
                    log.warning("skipped %s", line)
            yield at, after, doc

    def next_row(self, seq_len: int, pad_id: int, report: PackReport):
        """One row from this source; the cursor moves to where the next one starts."""
        if self._docs is None:
            self._docs, self._doc, self._start = self._documents(), None, self.cursor["token"]
        row = RowFiller(seq_len, pad_id, report)
        while not row.full:
            if self._doc is None:
                self._at, self._after, self._doc = next(self._docs)
            self._start = row.take(self._doc, self._start)
            if self._start >= len(self._doc.tokens):
                self._doc, self._start = None, 0
        where, token = (self._at, self._start) if self._doc is not None else (self._after, 0)
        self.cursor = {"epoch": where[0], "shard": where[1], "offset": where[2], "token": token}
        self.rows += 1
        return row.close()


class StreamLoader:
    """This replica's micro-batches per step from `data.path` (or the `data.blend` of shard folders)."""

    def __init__(self, cfg, run_dir: str, replica: int, replicas: int, gather=lambda x: [x]) -> None:
        data, train, m = cfg.data, cfg.train, cfg.model
        self.micro_batch, self.replica, self.replicas, self.gather = train.micro_batch, replica, replicas, gather
        if train.global_batch % (train.micro_batch * replicas):
            raise ValueError(f"train.global_batch ({train.global_batch}) must be divisible by train.micro_batch × "
                             f"data-parallel size ({train.micro_batch} × {replicas})")
        self.micro_steps = train.global_batch // (train.micro_batch * replicas)
        blend = data.blend or [1.0, data.path]
        if not blend[1::2] or not all(blend[1::2]):
            raise ConfigError("config error at 'data.path': data.source=shards needs a folder written by "
                              "scimoe-preprocess --multimodal (or data.blend: [weight, folder, …])")
        self.weights = torch.tensor([float(w) for w in blend[0::2]], dtype=torch.float64)
        self.paths = [str(p) for p in blend[1::2]]
        self.seed, self.seq_len, self.rows = train.seed, train.seq_len, 0
        self.bad = BadCount(data.max_bad_fraction)
        self.report = PackReport()
        tokenizer = self._check(cfg, run_dir)
        self.pad_id = tokenizer.token_to_id(EOS)
        self.pool = _Inline() if data.workers == 0 else concurrent.futures.ProcessPoolExecutor(
            data.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
            initargs=(os.getpid(),))
        args = (train.seq_len, {"min_pixels": m.vision.min_pixels, "max_pixels": m.vision.max_pixels},
                (m.image_token_id, m.ts_token_id))
        self.sources = [SourceStream(p, i, replica, replicas, train.seed, args, self.pool, data.prefetch, self.bad)
                        for i, p in enumerate(self.paths)]

    def _check(self, cfg, run_dir: str):
        """Every source was written for this model's image and series sizes and with one tokenizer, which the
        run then uses (copied into the run folder); refused by key otherwise."""
        first = None
        for path in self.paths:
            index = read_index(path)
            vision = {"min_pixels": cfg.model.vision.min_pixels, "max_pixels": cfg.model.vision.max_pixels}
            for key, value in vision.items():
                if index["vision"][key] != value:
                    raise ConfigError(f"config error at 'model.vision.{key}': {value}, but {path} was written with "
                                      f"{index['vision'][key]} (placeholder counts depend on it)")
            tok_file = os.path.join(path, index["tokenizer"])
            with open(tok_file, "rb") as f:
                content = f.read()
            if first is not None and content != first[1]:
                raise ConfigError(f"config error at 'data.blend': {path} and {first[0]} were tokenised differently")
            first = first or (tok_file, content)
        if cfg.data.tokenizer and os.path.abspath(cfg.data.tokenizer) != os.path.abspath(first[0]):
            with open(cfg.data.tokenizer, "rb") as f:
                if f.read() != first[1]:
                    raise ConfigError(f"config error at 'data.tokenizer': {cfg.data.tokenizer} is not the tokenizer "
                                      f"the shards were written with ({first[0]})")
        os.makedirs(run_dir, exist_ok=True)
        shutil.copyfile(first[0], os.path.join(run_dir, "tokenizer.json"))
        return load_tokenizer(first[0], cfg.model.vocab_size)

    def _source(self) -> SourceStream:
        if len(self.sources) == 1:
            return self.sources[0]
        gen = torch.Generator().manual_seed(self.seed * 1000003 + self.replica * 7919 + self.rows)
        return self.sources[int(torch.multinomial(self.weights, 1, generator=gen))]

    def next_step(self) -> list[dict]:
        """This replica's micro-batches for the next optimizer step."""
        batches = []
        for _ in range(self.micro_steps):
            rows = []
            for _ in range(self.micro_batch):
                rows.append(self._source().next_row(self.seq_len, self.pad_id, self.report))
                self.rows += 1
            batches.append({"input_ids": torch.tensor([r[0] for r in rows]), "positions": torch.tensor([r[1] for r in rows]),
                            "labels": torch.tensor([r[2] for r in rows]), "images": [i for r in rows for i in r[3]],
                            "series": [s for r in rows for s in r[4]]})
        return batches

    def state_dict(self) -> dict:
        """Every replica's place (gathered over the job), so a resume in another layout finds its own."""
        mine = {"replica": self.replica, "rows": self.rows, "sources": [dict(s.cursor) for s in self.sources]}
        states = {s["replica"]: s for s in self.gather(mine)}
        return {"kind": "stream", "paths": self.paths, "replicas": self.replicas,
                "states": [states[r] for r in sorted(states)]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream" or state.get("paths") != self.paths:
            raise ValueError(f"the checkpoint's data state is not of a stream over {self.paths} "
                             f"(it was saved for {state.get('paths', 'another data source')})")
        if state["replicas"] != self.replicas:
            raise ValueError(f"the streamed data position was saved by {state['replicas']} data-parallel replicas, "
                             f"this run has {self.replicas} (world / (tp·pp·cp)): each replica reads its own shards, "
                             "so resuming exactly needs the same number")
        mine = state["states"][self.replica]
        self.rows = mine["rows"]
        for source, cursor in zip(self.sources, mine["sources"]):
            source.cursor, source._docs = dict(cursor), None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
