"""Checkpoints: `DIR/checkpoints/step_{N:08d}/` with a completion marker written last.

Tested by `python -m pytest tests/train/test_pretrain.py tests/distributed`. A checkpoint is written into
a hidden temporary folder, every file fsynced, the folder renamed into place, and only then is the
`COMPLETE` marker created (temp file, fsync, rename). `resume=auto` loads the newest folder that has
the marker, so a save cut short is never loaded. With several ranks each writes its own files
(`*_rank00003.*`) between barriers and rank 0 renames and marks; such a checkpoint resumes into the
same layout (changing layouts is the checkpoint issue's work).
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
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

FORMAT_VERSION = 1
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


def _noop() -> None:
    pass


def save(run_dir: str, step: int, model: torch.nn.Module, optimizer: Any,
         loader_state: dict, config_yaml: str, rank: int = 0, world: int = 1,
         barrier: Callable[[], None] = _noop) -> str:
    """Write checkpoint `step` atomically (every rank calls this) and return its folder."""
    final = step_dir(run_dir, step)
    root = checkpoint_root(run_dir)
    tmp = os.path.join(root, f".step_{step:08d}.tmp")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    suffix = "" if world == 1 else f"_rank{rank:05d}"
    train_state = {"step": step, "loader": loader_state, "rng": rng_state(), "world": world}
    files = {
        f"model{suffix}.safetensors": save_safetensors(tensor_state(model), metadata={"step": str(step)}),
        f"optimizer{suffix}.pt": _torch_bytes(optimizer.state_dict()),
        f"train_state{suffix}.pt": _torch_bytes(train_state),
    }
    if rank == 0:
        files["config.yaml"] = config_yaml.encode()
    digests = {name: _fsync_write(os.path.join(tmp, name), data) for name, data in files.items()}
    _fsync_write(os.path.join(tmp, f".manifest{suffix}.json"), json.dumps(digests).encode())
    barrier()
    if rank == 0:
        manifest: dict[str, str] = {}
        for part in sorted(n for n in os.listdir(tmp) if n.startswith(".manifest")):
            with open(os.path.join(tmp, part)) as f:
                manifest.update(json.load(f))
        _fsync_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if os.path.exists(final):  # an earlier save of this step that never completed
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        marker_tmp = os.path.join(final, f".{MARKER}.tmp")
        marker = {"step": step, "format_version": FORMAT_VERSION, "world": world}
        _fsync_write(marker_tmp, json.dumps(marker).encode())
        os.rename(marker_tmp, os.path.join(final, MARKER))
        _fsync_dir(final)
    barrier()
    return final


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


def find_resume_path(run_dir: str, resume: str) -> str | None:
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
        raise ValueError(f"checkpoint.resume: '{resume}' is not a complete checkpoint (no {MARKER} marker)")
    bad = verify(resume)
    if bad:
        raise ValueError(f"checkpoint.resume: '{resume}' is corrupted: {', '.join(bad)} do not match {MANIFEST}")
    return resume


def load(path: str, model: torch.nn.Module, optimizer: Any, rank: int = 0, world: int = 1) -> dict:
    """Restore model, optimizer and RNG from `path`; returns the train state (step, loader)."""
    with open(os.path.join(path, MARKER)) as f:
        saved_world = json.load(f).get("world", 1)
    if saved_world != world:
        raise ValueError(f"checkpoint {path} was saved by {saved_world} ranks but this run has {world}; "
                         "resuming into another layout is not supported yet")
    suffix = "" if world == 1 else f"_rank{rank:05d}"
    weights = load_file(os.path.join(path, f"model{suffix}.safetensors"))
    expected = set(tensor_state(model))
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(weights, strict=False)  # non-tensor entries (megatron's _extra_state) stay
    optimizer.load_state_dict(torch.load(os.path.join(path, f"optimizer{suffix}.pt"), weights_only=False))
    state = torch.load(os.path.join(path, f"train_state{suffix}.pt"), weights_only=False)
    set_rng_state(state["rng"])
    return state


def prune(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path)
