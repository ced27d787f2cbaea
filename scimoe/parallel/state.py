"""Process groups for a layout, created by megatron-core's `parallel_state` (the one source of truth).

Used by the training entry point under torchrun (`torchrun --nproc_per_node=4 -m scimoe.train
parallel.ep=2`); tested by `tests/distributed/test_parity.py`. Groups are returned in a `Groups`
object that callers pass explicitly; megatron's module globals stay inside this file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from scimoe.parallel.dims import ParallelDims


@dataclass
class Groups:
    """The process groups one rank takes part in (None on a single process)."""

    dp: Any = None
    """Ranks holding replicas of the dense weights and seeing different data."""
    tp: Any = None
    """Ranks that split attention heads, vocabulary and embedding (tensor parallel)."""
    tp_rank: int = 0
    pp: Any = None
    """Ranks holding consecutive pipeline stages of one model replica."""
    pp_rank: int = 0
    ep: Any = None
    """Ranks that share one full set of experts (all-to-all dispatch)."""
    expert_dp: Any = None
    """Ranks holding replicas of the same expert shard."""
    dp_rank: int = 0
    ep_rank: int = 0


def dims_from_env(parallel) -> ParallelDims:
    """ParallelDims from torchrun's WORLD_SIZE/RANK (1/0 when absent) and `parallel.*` sizes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return ParallelDims(world_size=world, rank=rank, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, etp=parallel.etp)


def init_process_groups(dims: ParallelDims) -> Groups:
    """Start torch.distributed (gloo on CPU, NCCL on GPUs) and megatron-core's groups for `dims`."""
    if dims.is_single_process:
        return Groups()
    if dims.etp > 1 or (dims.tp > 1 and dims.ep > 1):
        raise NotImplementedError(f"{dims.describe()}: expert tensor parallelism and tensor parallelism combined "
                                  "with expert parallelism are not built yet")
    if not torch.cuda.is_available():
        from scimoe.parallel.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=dims.rank, world_size=dims.world_size)
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(dims.tp, dims.pp, expert_model_parallel_size=dims.ep,
                                 expert_tensor_parallel_size=dims.etp, create_gloo_process_groups=False)
    return Groups(dp=ps.get_data_parallel_group(), tp=ps.get_tensor_model_parallel_group(),
                  tp_rank=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_group(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(), ep=ps.get_expert_model_parallel_group(),
                  expert_dp=ps.get_expert_data_parallel_group(), dp_rank=ps.get_data_parallel_rank(),
                  ep_rank=ps.get_expert_model_parallel_rank())


def rank_grid(dims: ParallelDims) -> str:
    """The world laid out as (dp, ep-within-dp) rows, e.g. for printing once at start."""
    lines = [f"rank grid {dims.describe().rsplit(' rank', 1)[0]} (world {dims.world_size}):"]
    per_row = dims.ep
    for start in range(0, dims.world_size, per_row):
        ranks = list(range(start, start + per_row))
        lines.append(f"  expert-parallel group {start // per_row}: ranks {ranks}")
    if dims.ep > 1 and dims.dp > dims.ep:
        for e in range(dims.ep):
            lines.append(f"  expert-data-parallel group {e}: ranks {list(range(e, dims.world_size, dims.ep))}")
    return "\n".join(lines)
