"""DeepSpeed's MoE group registry, filled with megatron-core's groups (the same ranks, one truth).

Tested by `tests/distributed/test_parity.py` (the grad-norm launch checks the registry). DeepSpeed
components (its MoE utilities, ZeRO's MoE-aware parameter groups) look groups up by name
(`ep_size_<ep>`) and read tensor/data-parallel groups from an `mpu` object; we register megatron's
expert and expert-data-parallel groups under that name, hand DeepSpeed an mpu adapter, and tag expert
parameters the way DeepSpeed does (`allreduce=False`, `group_name`), so nothing builds a second,
possibly different, set of groups.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.state import Groups


class MegatronMPU:
    """The Megatron-style accessors DeepSpeed reads from `groups.mpu`."""

    def __init__(self, groups: Groups) -> None:
        self.groups = groups

    def get_tensor_model_parallel_group(self):
        return self.groups.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.groups.tp)

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_data_parallel_group(self):
        return self.groups.dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.groups.dp)

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_pipeline_model_parallel_group(self):
        return self.groups.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.groups.pp)

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank


def register_with_deepspeed(dims: ParallelDims, expert_params) -> str:
    """Register megatron's ep / expert-dp groups in DeepSpeed and tag `expert_params`; returns the name."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if dist.get_backend() == "nccl" else "cpu")
    from deepspeed.utils import groups as ds_groups

    name, groups = f"ep_size_{dims.ep}", dims.groups
    ds_groups.mpu = MegatronMPU(groups)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(groups.ep)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.expert_dp
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(groups.expert_dp)
    for p in expert_params:
        p.allreduce, p.group_name = False, name
    return name
