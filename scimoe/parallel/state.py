"""Process groups for a layout, created by megatron-core's `parallel_state` (the one source of truth).

Used through `ParallelDims.build_groups()` (scimoe/parallel/dims.py), which keeps the `Groups` it returns;
tested by `python -m pytest tests/distributed/test_parity.py`. megatron's module globals stay inside this file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Groups:
    """The process groups one rank takes part in (None on a single process)."""

    dp: Any = None
    """Ranks holding replicas of the dense weights and different tokens: data × context parallel (megatron's
    dp-cp group); gradients, token counts and balance statistics are summed over it."""
    tp: Any = None
    """Ranks that split attention heads, vocabulary and embedding (tensor parallel)."""
    tp_rank: int = 0
    pp: Any = None
    """Ranks holding consecutive pipeline stages of one model replica."""
    pp_rank: int = 0
    tp_dp: Any = None
    """All ranks of one pipeline stage (tp × cp × dp): with tp and ep together, each holds distinct tokens."""
    cp: Any = None
    """Ranks holding the chunks of the same rows (context parallel)."""
    cp_rank: int = 0
    tp_cp: Any = None
    """Ranks holding other positions of the same rows: sequence shards (tp, with SP) × context chunks."""
    data_rank: int = 0
    """Which rows this rank reads: its rank among the data-parallel replicas proper (without cp)."""
    ep: Any = None
    """Ranks that share one full set of experts (all-to-all dispatch)."""
    expert_dp: Any = None
    """Ranks holding replicas of the same expert shard."""
    dp_rank: int = 0
    ep_rank: int = 0
    etp: Any = None
    """Ranks that split each expert's hidden width (expert tensor parallel; the tp group when etp = tp)."""
    etp_rank: int = 0


def create_groups(dims) -> Groups:
    """Start torch.distributed (gloo on CPU, NCCL on GPUs) and megatron-core's groups for `dims`."""
    if not torch.cuda.is_available():
        from scimoe.parallel.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=dims.rank, world_size=dims.world_size,
                                timeout=timedelta(seconds=dims.collective_timeout_s))
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(dims.tp, dims.pp, context_parallel_size=dims.cp, expert_model_parallel_size=dims.ep,
                                 expert_tensor_parallel_size=dims.etp, create_gloo_process_groups=False,
                                 distributed_timeout_minutes=dims.collective_timeout_s / 60)  # a timedelta's minutes
    return Groups(dp=ps.get_data_parallel_group(with_context_parallel=True), tp=ps.get_tensor_model_parallel_group(),
                  tp_rank=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_group(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(),
                  tp_dp=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
                  cp=ps.get_context_parallel_group(), cp_rank=ps.get_context_parallel_rank(),
                  tp_cp=ps.get_tensor_and_context_parallel_group(), data_rank=ps.get_data_parallel_rank(),
                  ep=ps.get_expert_model_parallel_group(),
                  expert_dp=ps.get_expert_data_parallel_group(),
                  dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
                  ep_rank=ps.get_expert_model_parallel_rank(), etp=ps.get_expert_tensor_parallel_group(),
                  etp_rank=ps.get_expert_tensor_parallel_rank())


def rank_grid(dims, coordinates: list[dict[str, int]]) -> str:
    """A table of every rank's coordinates (from `gather_coordinates`), one line per rank."""
    lines = [f"rank grid {dims.describe().rsplit(' rank', 1)[0]} (world {dims.world_size}):",
             "  rank  tp  pp  cp  dp  ep  expert-dp"]
    for rank, c in enumerate(coordinates):
        lines.append(f"  {rank:4d}  {c['tp']:2d}  {c['pp']:2d}  {c['cp']:2d}  {c['dp']:2d}  {c['ep']:2d}  "
                     f"{c['expert_dp']:9d}")
    return "\n".join(lines)


def gather_coordinates(dims) -> list[dict[str, int]]:
    """Every rank's position in each group, as megatron-core actually built them."""
    g = dims.groups
    if dims.is_single_process:
        return [{"tp": 0, "pp": 0, "cp": 0, "dp": 0, "ep": 0, "expert_dp": 0}]
    mine = {"tp": g.tp_rank, "pp": g.pp_rank, "cp": g.cp_rank, "dp": g.data_rank, "ep": g.ep_rank, "expert_dp": dist.get_rank(g.expert_dp)}
    return dims.all_gather_object(mine)
