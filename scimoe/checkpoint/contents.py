"""Checkpoint contents: every rank's model and optimizer slices, the train state, and loading them back into
any layout. The folder protocol (atomic save, markers, manifests, what to resume) is scimoe/checkpoint/storage.py.

Tested by `python -m pytest tests/train/test_checkpoint.py tests/distributed`. Each rank writes
`model_rankR.safetensors` / `optimizer_rankR.safetensors` holding the slices it owns, tagged with their
place in the single-process tensors (scimoe/checkpoint/shards.py), and `train_state_rankR.pt` (step, loader
position, RNG); rank 0 adds `config.yaml`. So a checkpoint loads into any layout: tp, pp, ep, dp and ZeRO
sharding may all change between save and resume.
"""
from __future__ import annotations

import io
import logging
import os
import random
from typing import Any, Callable

import numpy as np
import torch

from scimoe.checkpoint import shards, storage
from scimoe.checkpoint.async_save import AsyncSaver
from scimoe.checkpoint.storage import CONVENTIONS, CheckpointError, read_marker
from scimoe.parallel.dims import ParallelDims

log = logging.getLogger("scimoe")


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
    """The model's tensors (megatron layers add `_extra_state` entries that are None). Under mixed precision a
    parameter's value is its fp32 master (scimoe/train/master.py), and one whose master another rank holds is
    left to that rank."""
    params = dict(model.named_parameters())
    out = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        p = params.get(k)
        if p is not None and "master" in vars(p):
            if p.master is None:
                continue
            v = p.master
        out[k] = v.detach().contiguous().cpu()
    return out


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
         on_complete: Callable[[], None] | None = None, extra_state: dict | None = None,
         extra_files: dict[str, bytes] | None = None) -> str:
    """Write checkpoint `step` atomically (every rank calls this) and return its folder. With `saver` the
    files are written in the background; `on_complete` runs on rank 0 once the marker is in place;
    `extra_files` (the run's tokenizer) are written by rank 0."""
    model_entries, optim_entries = _entries(model, optimizer, shards.shard_layout(model, dims))
    train_state = {"step": step, "loader": dict(loader_state), "rng": rng_state(), "world": dims.world_size,
                   **(extra_state or {})}
    return write(run_dir, step, model_entries, optim_entries, train_state, config_yaml, dims, saver, on_complete,
                 extra_files)


def write(run_dir: str, step: int, model_entries: dict, optim_entries: dict | None, train_state: dict | None,
          config_yaml: str, dims: ParallelDims = ParallelDims(), saver: AsyncSaver | None = None,
          on_complete: Callable[[], None] | None = None, extra_files: dict[str, bytes] | None = None) -> str:
    """Entries {key: (name, tensor, placement)} as checkpoint `step`, each slice written once, by the lowest
    rank holding it; `extra_files` {name: bytes} by rank 0. `optim_entries=None` and `train_state=None` make a
    weights-only checkpoint (what `scimoe-import` writes)."""
    rank = dims.rank
    everyone = dims.all_gather_object((sorted(model_entries), sorted(optim_entries or {})))
    model_writer = shards.choose_writers([m for m, _ in everyone])
    optim_writer = shards.choose_writers([o for _, o in everyone])
    copy = (lambda t: t.detach().to("cpu", copy=True)) if saver is not None else (lambda t: t)
    mine = {k: (n, copy(t), w) for k, (n, t, w) in model_entries.items() if model_writer[k] == rank}
    mine_optim = None if optim_entries is None else \
        {k: (n, copy(t), w) for k, (n, t, w) in optim_entries.items() if optim_writer[k] == rank}
    suffix = f"_rank{rank:05d}"

    def encoded() -> dict[str, bytes]:
        out = {f"model{suffix}.safetensors": shards.encode(mine)}
        if mine_optim is not None:
            out[f"optimizer{suffix}.safetensors"] = shards.encode(mine_optim)
        if train_state is not None:
            out[f"train_state{suffix}.pt"] = _torch_bytes(train_state)
        if rank == 0:
            out["config.yaml"] = config_yaml.encode()
            out.update(extra_files or {})
        return out

    return storage.write(run_dir, step, encoded, dims, saver, {"weights_only": train_state is None}, on_complete)


def files(path: str, kind: str) -> list[str]:
    """Every rank's `kind` (model / optimizer) file of checkpoint `path`."""
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.startswith(f"{kind}_rank"))


def check_conventions(marker: dict, model: torch.nn.Module, path: str) -> None:
    """Refuse weights whose numbers assume another convention than this model computes with."""
    from scimoe.model.rotary import FoPE

    rotary = getattr(model, "rotary", None)
    clipped = isinstance(rotary, FoPE) and rotary.kept < rotary.half
    if clipped and marker.get("conventions", {}).get("fope_clipped_sin") != CONVENTIONS["fope_clipped_sin"]:
        raise CheckpointError(f"{path} was written by an earlier scimoe whose FoPE padded the sine of the clipped "
                              "frequencies with 0; the released Intern-S1-Pro, and scimoe now, pad it with 1, so these "
                              "weights would compute a different function. Retrain, or fine-tune from released weights "
                              "(checkpoint.init_weights=hf:PATH)")


def load_weights(path: str, model: torch.nn.Module, dims: ParallelDims = ParallelDims()) -> None:
    """Load the model weights of checkpoint `path`, saved in any layout, into this rank's slices."""
    check_conventions(read_marker(path), model, path)
    index = shards.ShardIndex(files(path, "model"))
    _load_model(index, model, shards.shard_layout(model, dims), path)


ARCHITECTURE = ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "pos_emb", "rope_theta",
                "max_positions", "fope_sep_head", "moe.num_experts", "moe.top_k", "moe.n_groups", "moe.ffn_hidden",
                "moe.dense_layers", "moe.dense_ffn_hidden", "moe.shared_expert_ffn", "vision.enabled", "vision.hidden",
                "vision.layers", "vision.heads", "vision.mlp", "vision.grid", "timeseries.enabled", "timeseries.hidden",
                "timeseries.layers", "timeseries.heads", "timeseries.ffn", "timeseries.embed_hidden")


def load_hf_weights(folder: str, model: torch.nn.Module, cfg, dims: ParallelDims = ParallelDims()) -> None:
    """`checkpoint.init_weights=hf:FOLDER`: this rank's slices of a Hugging Face folder, read lazily; the folder's
    architecture must be the run's (the first difference is named)."""
    from scimoe.checkpoint.hf_index import HFIndex, read_config
    from scimoe.config import ConfigError

    theirs = read_config(folder)
    for key in ARCHITECTURE:
        ours_value, their_value = cfg, theirs
        for part in key.split("."):
            ours_value, their_value = getattr(ours_value, part), getattr(their_value, part)
        if ours_value != their_value and not (key.startswith(("vision.", "timeseries.")) and
                                              not getattr(getattr(cfg, key.split(".")[0]), "enabled")):
            raise ConfigError(f"config error at 'model.{key}': {ours_value!r} in this run, {their_value!r} in "
                              f"checkpoint.init_weights=hf:{folder} (its config.json)")
    _load_model(HFIndex(folder, theirs), model, shards.shard_layout(model, dims), folder)


def _load_model(index: shards.ShardIndex, model: torch.nn.Module, layout: dict, path: str) -> None:
    """Every tensor of the model read from `index` and copied in place, one at a time: the peak is the model
    plus one slice (non-tensor entries, megatron's _extra_state, stay). A parameter with an fp32 master
    (scimoe/train/master.py) gets the saved value there too, unrounded."""
    local = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}  # sharing storage
    params = dict(model.named_parameters())
    missing = sorted(name for name in local if name not in index)
    if missing:
        raise ValueError(f"checkpoint {path} does not fit the model: it lacks {missing[:5]}"
                         f"{' and more' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, target in local.items():
            value = shards.read_local(index, name, tuple(target.shape), layout.get(name))
            master = vars(params[name]).get("master") if name in params else None
            if master is not None:
                master.copy_(value)
            target.copy_(value)


def load(path: str, model: torch.nn.Module, optimizer: Any, dims: ParallelDims = ParallelDims()) -> dict:
    """Restore model, optimizer and RNG from `path`, saved in this or any other layout; returns the
    train state (step, loader). RNG streams are per rank: restored when the world size is unchanged."""
    rank, world = dims.rank, dims.world_size
    marker = read_marker(path)
    check_conventions(marker, model, path)
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
