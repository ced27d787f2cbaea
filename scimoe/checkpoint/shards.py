"""Layout-independent tensor files: every rank writes the slices it holds, tagged with where they sit in
the single-process tensor, and any layout reads back exactly the slices it needs.

Tested by `python -m pytest tests/train/test_shards.py tests/distributed/test_parity.py` (resumes across layouts).
A file is a safetensors blob whose metadata maps each entry to (name, global shape, offsets). Replicas
(dp copies, the FoPE tables on every pipeline stage) are written once, by the lowest rank holding them,
so a checkpoint holds each element of each tensor exactly once whatever the layout. Reading assembles a
requested slice from every piece that overlaps it, and fails by name if any element is missing.
This is what megatron's `dist_checkpointing` and torch DCP do too; docs/design.md says why it is ours.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

METADATA_KEY = "scimoe_pieces"


@dataclass(frozen=True)
class Placement:
    """Where a local tensor sits inside the single-process (global) tensor."""

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]


def placement(local: torch.Tensor, shard: tuple[int, int, int] | None) -> Placement:
    """Placement of `local`, which is slice `index` of `parts` equal slices along `dim` (or whole)."""
    shape, offsets = list(local.shape), [0] * local.dim()
    if shard is not None:
        dim, index, parts = shard
        offsets[dim] = index * shape[dim]
        shape[dim] *= parts
    return Placement(tuple(shape), tuple(offsets))


@dataclass(frozen=True)
class Shard:
    """How a local tensor was cut from the global one: slice `index` of `parts` equal slices along each
    `dim` of `splits`; with `glu_dim`, that dimension holds two halves (SwiGLU's gate and up rows) each
    cut the same way, so the local tensor is two pieces of the global one."""

    splits: tuple[tuple[int, int, int], ...]
    glu_dim: int | None = None


def pieces(local: torch.Tensor, shard: Shard | tuple[int, int, int] | None) -> list[tuple[torch.Tensor, Placement]]:
    """The contiguous pieces of `local` with their placements in the global tensor."""
    if shard is None or isinstance(shard, tuple):
        return [(local, placement(local, shard))]
    shape, offsets = list(local.shape), [0] * local.dim()
    for dim, index, parts in shard.splits:
        offsets[dim] = index * shape[dim]
        shape[dim] *= parts
    if shard.glu_dim is None:
        return [(local, Placement(tuple(shape), tuple(offsets)))]
    d = shard.glu_dim
    half_local = local.shape[d] // 2
    parts = next((p for dim, _, p in shard.splits if dim == d), 1)
    out = []
    for h, half in enumerate(local.split(half_local, dim=d)):
        where = list(offsets)
        where[d] = h * half_local * parts + offsets[d] // 2
        out.append((half, Placement(tuple(shape), tuple(where))))
    return out


def read_local(index: "ShardIndex", name: str, local_shape: tuple[int, ...], shard) -> torch.Tensor:
    """The local tensor of `name` for `shard`, assembled from the checkpoint's pieces."""
    empty = torch.empty(local_shape, device="meta")
    parts = [index.read(name, where, tuple(view.shape)) for view, where in pieces(empty, shard)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.glu_dim)


def entry_key(name: str, where: Placement) -> str:
    """Unique per slice: two ranks holding the same key hold replicas."""
    return name if not any(where.offsets) else f"{name}@{','.join(map(str, where.offsets))}"


def encode(entries: dict[str, tuple[str, torch.Tensor, Placement]]) -> bytes:
    """One file's bytes: {key: (name, local tensor, placement)}."""
    pieces = {key: {"name": name, "global_shape": list(where.global_shape), "offsets": list(where.offsets)}
              for key, (name, _, where) in entries.items()}
    tensors = {key: t.detach().contiguous().cpu() for key, (_, t, _) in entries.items()}
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(pieces)})


def choose_writers(keys_per_rank: list[list[str]]) -> dict[str, int]:
    """The rank that writes each key: the lowest one holding it."""
    writer: dict[str, int] = {}
    for rank, keys in enumerate(keys_per_rank):
        for key in keys:
            writer.setdefault(key, rank)
    return writer


@dataclass(frozen=True)
class _Piece:
    file: str
    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


class ShardIndex:
    """Every piece of every tensor in a set of files written by `encode`."""

    def __init__(self, files: list[str]) -> None:
        self.pieces: dict[str, list[_Piece]] = {}
        self.global_shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        for file in files:
            handle = self._open(file)
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            for key, info in meta.items():
                piece = handle.get_slice(key)
                shape = tuple(piece.get_shape())
                self.pieces.setdefault(info["name"], []).append(_Piece(file, key, tuple(info["offsets"]), shape))
                self.global_shapes[info["name"]] = tuple(info["global_shape"])
                self.dtypes[info["name"]] = piece.get_dtype()

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.pieces

    def names(self) -> list[str]:
        return sorted(self.pieces)

    def element_size(self, name: str) -> int:
        """Bytes per element of `name` as stored."""
        return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1,
                "BOOL": 1}[self.dtypes[name]]

    def full(self, name: str) -> torch.Tensor:
        shape = self.global_shapes.get(name, ())
        return self.read(name, Placement(shape, (0,) * len(shape)), shape)

    def read(self, name: str, where: Placement, shape: tuple[int, ...]) -> torch.Tensor:
        """The slice of global tensor `name` at `where` with local `shape`, from every overlapping piece."""
        if name not in self.pieces:
            raise KeyError(f"checkpoint has no tensor '{name}'")
        if tuple(where.global_shape) != self.global_shapes[name]:
            raise ValueError(f"tensor '{name}' is {list(self.global_shapes[name])} in the checkpoint but "
                             f"{list(where.global_shape)} in this model: the model config differs")
        out: torch.Tensor | None = None
        filled = 0
        for piece in self.pieces[name]:
            lo = [max(a, b) for a, b in zip(piece.offsets, where.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(piece.offsets, piece.shape, where.offsets, shape)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            src = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, piece.offsets))
            part = self._open(piece.file).get_slice(piece.key)[src] if src else self._open(piece.file).get_tensor(piece.key)
            if out is None:
                out = torch.empty(shape, dtype=part.dtype)
            out[tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, where.offsets))] = part
            filled += math.prod(h - low for low, h in zip(lo, hi))
        if out is None or filled != math.prod(shape):
            raise ValueError(f"checkpoint pieces of '{name}' cover {filled} of the {math.prod(shape)} elements "
                             f"this rank needs at offsets {list(where.offsets)}: files are missing")
        return out


def shard_layout(model: torch.nn.Module, dims) -> dict[str, Shard]:
    """{state-dict name: Shard} for every tensor this rank holds only a slice of. TP shards (megatron's
    `partition_dim`) are slice tp_rank of tp; expert weights slice ep_rank of ep along the expert axis and,
    under etp, slice etp_rank of their hidden width (gate_up: of its gate and of its up half). Pipeline
    stages keep the single-process names, so need no entry."""
    if dims.is_single_process:
        return {}
    from scimoe.parallel.expert import expert_parameters
    from scimoe.parallel.tensor import tensor_parallel_tensors

    g = dims.groups
    layout = {name: Shard(((t.partition_dim, g.tp_rank, dims.tp),)) for name, t in tensor_parallel_tensors(model)}
    if dims.ep == 1 and dims.etp == 1:
        return layout
    experts = {id(p) for p in expert_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) not in experts:
            continue
        splits = [(0, g.ep_rank, dims.ep)] if dims.ep > 1 else []
        glu = name.endswith("gate_up_proj")
        if dims.etp > 1:
            splits.append((1 if glu else 2, g.etp_rank, dims.etp))
        layout[name] = Shard(tuple(splits), glu_dim=1 if glu and dims.etp > 1 else None)
    return layout
