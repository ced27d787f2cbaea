"""Checkpoints: `DIR/checkpoints/step_{N:08d}/` with a completion marker written last.

Tested by `python -m pytest tests/train/test_checkpoint.py tests/distributed`. A checkpoint is written
into a hidden temporary folder, every file fsynced, the folder renamed into place, and only then is the
`COMPLETE` marker created (temp file, fsync, rename). `resume=auto` loads the newest folder that has the
marker and matches its SHA-256 `MANIFEST.json`, so a save cut short or a corrupted file is never loaded.
Each rank writes `model_rankR.safetensors` / `optimizer_rankR.safetensors` holding the slices it owns,
tagged with their place in the single-process tensors (scimoe/train/shards.py), so a checkpoint loads
into any layout: tp, pp, ep, dp and ZeRO sharding may all change between save and resume.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch

from scimoe.parallel.dims import ParallelDims
from scimoe.train import shards
from scimoe.train.async_save import AsyncSaver, wait_for_parts

FORMAT_VERSION = 2
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
log = logging.getLogger("scimoe")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(run_dir), f"step_{step:08d}")


def _fsync_write(path: str, data: bytes) -> str:
    """Write, flush and fsync `data`; returns its SHA-256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tensor_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors (megatron layers add `_extra_state` entries that are None)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _entries(model: torch.nn.Module, optimizer: Any, layout: dict) -> tuple[dict, dict]:
    """This rank's model and optimizer entries {key: (name, tensor, placement)}."""
    model_entries = {}
    for name, t in tensor_state(model).items():
        for view, where in shards.pieces(t, layout.get(name)):
            model_entries[shards.entry_key(name, where)] = (name, view, where)
    names = {id(p): n for n, p in model.named_parameters()}
    optim_entries = {}
    for param, state in (optimizer.parameter_states() if optimizer is not None else []):
        pname = names[id(param)]
        for field, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            name = f"{pname}::{field}"
            for view, where in shards.pieces(t, layout.get(pname) if t.shape == param.shape else None):
                optim_entries[shards.entry_key(name, where)] = (name, view, where)
    return model_entries, optim_entries


def save(run_dir: str, step: int, model: torch.nn.Module, optimizer: Any, loader_state: dict,
         config_yaml: str, dims: ParallelDims = ParallelDims(), saver: AsyncSaver | None = None,
         on_complete: Callable[[], None] | None = None, extra_state: dict | None = None) -> str:
    """Write checkpoint `step` atomically (every rank calls this) and return its folder. With `saver` the
    files are written in the background; `on_complete` runs on rank 0 once the marker is in place."""
    model_entries, optim_entries = _entries(model, optimizer, shards.shard_layout(model, dims))
    train_state = {"step": step, "loader": dict(loader_state), "rng": rng_state(), "world": dims.world_size,
                   **(extra_state or {})}
    return write(run_dir, step, model_entries, optim_entries, train_state, config_yaml, dims, saver, on_complete)


def write(run_dir: str, step: int, model_entries: dict, optim_entries: dict | None, train_state: dict | None,
          config_yaml: str, dims: ParallelDims = ParallelDims(), saver: AsyncSaver | None = None,
          on_complete: Callable[[], None] | None = None) -> str:
    """The atomic save protocol for entries {key: (name, tensor, placement)}. `optim_entries=None` and
    `train_state=None` make a weights-only checkpoint (what `scimoe-import` writes)."""
    rank, world = dims.rank, dims.world_size
    final = step_dir(run_dir, step)
    root = checkpoint_root(run_dir)
    tmp = os.path.join(root, f".step_{step:08d}.tmp")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    everyone = dims.all_gather_object((sorted(model_entries), sorted(optim_entries or {})))  # also a barrier
    model_writer = shards.choose_writers([m for m, _ in everyone])
    optim_writer = shards.choose_writers([o for _, o in everyone])
    copy = (lambda t: t.detach().to("cpu", copy=True)) if saver is not None else (lambda t: t)
    mine = {k: (n, copy(t), w) for k, (n, t, w) in model_entries.items() if model_writer[k] == rank}
    mine_optim = None if optim_entries is None else \
        {k: (n, copy(t), w) for k, (n, t, w) in optim_entries.items() if optim_writer[k] == rank}
    suffix = f"_rank{rank:05d}"

    def finish() -> None:
        files = {f"model{suffix}.safetensors": shards.encode(mine)}
        if mine_optim is not None:
            files[f"optimizer{suffix}.safetensors"] = shards.encode(mine_optim)
        if train_state is not None:
            files[f"train_state{suffix}.pt"] = _torch_bytes(train_state)
        if rank == 0:
            files["config.yaml"] = config_yaml.encode()
        digests = {name: _fsync_write(os.path.join(tmp, name), data) for name, data in files.items()}
        _fsync_write(os.path.join(tmp, f".manifest{suffix}.json"), json.dumps(digests).encode())
        if saver is None:
            dims.barrier()
        if rank == 0:
            if saver is not None:
                wait_for_parts(tmp, world)
            _complete(tmp, final, {"step": step, "format_version": FORMAT_VERSION, "world": world,
                                   "weights_only": train_state is None})
            if on_complete is not None:
                on_complete()

    if saver is None:
        finish()
        dims.barrier()
    else:
        saver.submit(finish)
    return final


def _complete(tmp: str, final: str, marker: dict) -> None:
    """Rank 0, once every rank's files are in `tmp`: manifest, rename into place, then the marker."""
    manifest: dict[str, str] = {}
    for part in sorted(n for n in os.listdir(tmp) if n.startswith(".manifest")):
        with open(os.path.join(tmp, part)) as f:
            manifest.update(json.load(f))
        os.remove(os.path.join(tmp, part))
    _fsync_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    if os.path.exists(final):  # an earlier save of this step that never completed
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(final))
    marker_tmp = os.path.join(final, f".{MARKER}.tmp")
    _fsync_write(marker_tmp, json.dumps(marker).encode())
    os.rename(marker_tmp, os.path.join(final, MARKER))
    _fsync_dir(final)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and is_complete(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def verify(path: str) -> list[str]:
    """Files of checkpoint `path` that are missing or whose SHA-256 differs from its manifest."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return [os.path.join(path, MANIFEST)]
    bad = []
    for name, digest in manifest.items():
        file = os.path.join(path, name)
        try:
            with open(file, "rb") as f:
                ok = hashlib.file_digest(f, "sha256").hexdigest() == digest
        except OSError:
            ok = False
        if not ok:
            bad.append(file)
    return bad


def find_resume_path(run_dir: str, resume: str, key: str = "checkpoint.resume") -> str | None:
    """Folder to resume from for `checkpoint.resume` (auto / never / a path), or None to start fresh.

    `auto` takes the newest complete checkpoint whose files match its manifest, reporting and
    skipping corrupted ones; an explicit path must be complete and intact."""
    if resume == "never":
        return None
    if resume == "auto":
        for _, path in reversed(complete_checkpoints(run_dir)):
            bad = verify(path)
            if not bad:
                return path
            log.error("checkpoint %s is corrupted (manifest mismatch: %s); falling back to an older one",
                      path, ", ".join(bad))
        return None
    if not is_complete(resume):
        raise ValueError(f"{key}: '{resume}' is not a complete checkpoint (no {MARKER} marker)")
    bad = verify(resume)
    if bad:
        raise ValueError(f"{key}: '{resume}' is corrupted: {', '.join(bad)} do not match {MANIFEST}")
    return resume


def _marker(path: str) -> dict:
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    if marker.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format_version {marker.get('format_version')}; this scimoe "
                         f"reads format_version {FORMAT_VERSION} only")
    return marker


def files(path: str, kind: str) -> list[str]:
    """Every rank's `kind` (model / optimizer) file of checkpoint `path`."""
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.startswith(f"{kind}_rank"))


def load_weights(path: str, model: torch.nn.Module, dims: ParallelDims = ParallelDims()) -> None:
    """Load the model weights of checkpoint `path`, saved in any layout, into this rank's slices."""
    _marker(path)
    index = shards.ShardIndex(files(path, "model"))
    _load_model(index, model, shards.shard_layout(model, dims), path)


def _load_model(index: shards.ShardIndex, model: torch.nn.Module, layout: dict, path: str) -> None:
    local = tensor_state(model)
    missing = sorted(name for name in local if name not in index)
    if missing:
        raise ValueError(f"checkpoint {path} does not fit the model: it lacks {missing[:5]}"
                         f"{' and more' if len(missing) > 5 else ''}")
    weights = {name: shards.read_local(index, name, tuple(t.shape), layout.get(name)) for name, t in local.items()}
    model.load_state_dict(weights, strict=False)  # non-tensor entries (megatron's _extra_state) stay


def load(path: str, model: torch.nn.Module, optimizer: Any, dims: ParallelDims = ParallelDims()) -> dict:
    """Restore model, optimizer and RNG from `path`, saved in this or any other layout; returns the
    train state (step, loader). RNG streams are per rank: restored when the world size is unchanged."""
    rank, world = dims.rank, dims.world_size
    marker = _marker(path)
    if marker.get("weights_only"):
        raise ValueError(f"checkpoint {path} holds weights only (an import): start from it with "
                         "checkpoint.init_weights=PATH, not checkpoint.resume")
    layout = shards.shard_layout(model, dims)
    _load_model(shards.ShardIndex(files(path, "model")), model, layout, path)
    index = shards.ShardIndex(files(path, "optimizer"))
    names = {id(p): n for n, p in model.named_parameters()}
    for param in optimizer.owned_parameters():
        name = names[id(param)]
        fields = [f for f in ("step", "exp_avg", "exp_avg_sq") if f"{name}::{f}" in index]
        if not fields:
            continue  # saved before this parameter's first update
        state = {}
        for field in fields:
            if field == "step":  # a scalar, the same everywhere, kept on the CPU as torch's AdamW does
                state[field] = shards.read_local(index, f"{name}::step", (), None)
            else:
                state[field] = shards.read_local(index, f"{name}::{field}", tuple(param.shape),
                                                 layout.get(name)).to(param.device)
        optimizer.set_parameter_state(param, state)
    same_world = marker.get("world", 1) == world
    own = os.path.join(path, f"train_state_rank{rank if same_world else 0:05d}.pt")
    state = torch.load(own, weights_only=False)
    if same_world:
        set_rng_state(state["rng"])
    elif rank == 0:
        log.info("checkpoint %s was saved by %d ranks, this run has %d: weights, optimizer state and data "
                 "position carry over; per-rank RNG streams restart from rank 0's", path, marker["world"], world)
    return state


def prune(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path)
