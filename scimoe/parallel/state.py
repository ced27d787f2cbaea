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
    tp_dp: Any = None
    """All ranks of one pipeline stage (tp × dp): with tp and ep together, each holds distinct tokens."""
    ep: Any = None
    """Ranks that share one full set of experts (all-to-all dispatch)."""
    expert_dp: Any = None
    """Ranks holding replicas of the same expert shard."""
    dp_rank: int = 0
    ep_rank: int = 0
    etp: Any = None
    """Ranks that split each expert's hidden width (expert tensor parallel; the tp group when etp = tp)."""
    etp_rank: int = 0


def dims_from_env(parallel) -> ParallelDims:
    """ParallelDims from torchrun's WORLD_SIZE/RANK, or a bare srun's SLURM_* (1/0 when absent), and
    `parallel.*` sizes."""
    from scimoe.launch.env import apply_launcher_env

    apply_launcher_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return ParallelDims(world_size=world, rank=rank, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, etp=parallel.etp)


def init_process_groups(dims: ParallelDims) -> Groups:
    """Start torch.distributed (gloo on CPU, NCCL on GPUs) and megatron-core's groups for `dims`."""
    if dims.is_single_process:
        return Groups()
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
                  pp_rank=ps.get_pipeline_model_parallel_rank(), tp_dp=ps.get_tensor_and_data_parallel_group(),
                  ep=ps.get_expert_model_parallel_group(),
                  expert_dp=ps.get_expert_data_parallel_group(), dp_rank=ps.get_data_parallel_rank(),
                  ep_rank=ps.get_expert_model_parallel_rank(), etp=ps.get_expert_tensor_parallel_group(),
                  etp_rank=ps.get_expert_tensor_parallel_rank())


def rank_grid(dims: ParallelDims, coordinates: list[dict[str, int]]) -> str:
    """A table of every rank's coordinates (from `gather_coordinates`), one line per rank."""
    lines = [f"rank grid {dims.describe().rsplit(' rank', 1)[0]} (world {dims.world_size}):",
             "  rank  tp  pp  dp  ep  expert-dp"]
    for rank, c in enumerate(coordinates):
        lines.append(f"  {rank:4d}  {c['tp']:2d}  {c['pp']:2d}  {c['dp']:2d}  {c['ep']:2d}  {c['expert_dp']:9d}")
    return "\n".join(lines)


def gather_coordinates(dims: ParallelDims, groups: Groups) -> list[dict[str, int]]:
    """Every rank's position in each group, as megatron-core actually built them."""
    if dims.is_single_process:
        return [{"tp": 0, "pp": 0, "dp": 0, "ep": 0, "expert_dp": 0}]
    mine = {"tp": groups.tp_rank, "pp": groups.pp_rank, "dp": groups.dp_rank, "ep": groups.ep_rank,
            "expert_dp": dist.get_rank(groups.expert_dp)}
    everyone: list = [None] * dims.world_size
    dist.all_gather_object(everyone, mine)
    return everyone
