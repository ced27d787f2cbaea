"""What the training step needs from the layout: sums over data-parallel ranks, gradient sync, the
global gradient norm, and gathering full weights. One object, passed explicitly.

`Runtime` is the single-process version (nothing to communicate); `DistributedRuntime` does expert +
data parallelism. Tested by `tests/distributed/test_parity.py` and `tests/distributed/test_grad_norm.py`.

Every loss term is a rank's share of a global-batch sum (see scimoe/model/moe/losses.py and
scimoe/train/step.py), so gradients are SUMMED, not averaged: dense ones over dp, expert ones over
expert-dp (each expert shard already got the gradient of every token of its ep group).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from scimoe.model import MoETransformer
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.expert import apply_expert_parallel, expert_parameters
from scimoe.parallel.state import Groups
from scimoe.parallel.tensor import (apply_tensor_parallel, gather_tensor_parallel, is_tensor_parallel,
                                    partial_grad_parameters)


class Runtime:
    """Single process: every reduction is the identity."""

    dims = ParallelDims()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def prepare(self, model: MoETransformer) -> None:
        """Shard and hook a freshly initialised full model for this layout."""

    def sync_grads(self, model: MoETransformer) -> None:
        pass

    def optimizer_shards(self, model: MoETransformer, zero: int) -> list | None:
        """[(params, group)] for ZeRO-1 sharding; None = one plain optimizer (nothing to shard over)."""
        return None

    def clip_grad_norm(self, model: MoETransformer, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))

    def full_state_dict(self, model: MoETransformer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    def barrier(self) -> None:
        pass


def _all_reduce_grads(params: list[torch.nn.Parameter], group) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class DistributedRuntime(Runtime):
    """Tensor, expert and data parallelism (tp×dp or ep×dp; pipeline parallelism is not built yet)."""

    def __init__(self, dims: ParallelDims, groups: Groups) -> None:
        self.dims, self.groups = dims, groups

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.groups.dp)
        return out

    def prepare(self, model: MoETransformer) -> None:
        apply_tensor_parallel(model, self.groups.tp, self.groups.tp_rank, self.dims.tp)
        apply_expert_parallel(model, self.groups.ep, self.groups.ep_rank, self.dims.ep)
        for moe in model.moe_layers():
            moe.stats_reduce = self.reduce_sum

    def _split(self, model: MoETransformer):
        """(dense, expert-sharded) parameters. Without ep the experts are replicated like dense weights
        (also across tp: our MoE runs whole on each tp rank, unlike megatron's etp=1 token split, so
        megatron's expert-dp group, which spans tp, must not be used for them)."""
        experts = {id(p) for p in expert_parameters(model)} if self.dims.ep > 1 else set()
        params = list(model.parameters())
        return [p for p in params if id(p) not in experts], [p for p in params if id(p) in experts]

    def optimizer_shards(self, model: MoETransformer, zero: int) -> list | None:
        if zero == 0:
            return None
        dense, experts = self._split(model)
        expert_dp = self.dims.dp // self.dims.ep
        return [(dense, self.groups.dp if self.dims.dp > 1 else None),
                (experts, self.groups.expert_dp if expert_dp > 1 else None)]

    def sync_grads(self, model: MoETransformer) -> None:
        dense, experts = self._split(model)
        if self.dims.tp > 1:
            _all_reduce_grads(partial_grad_parameters(model), self.groups.tp)
        if self.dims.dp > 1:
            _all_reduce_grads(dense, self.groups.dp)
        if self.dims.dp // self.dims.ep > 1:
            _all_reduce_grads(experts, self.groups.expert_dp)

    def clip_grad_norm(self, model: MoETransformer, max_norm: float) -> float:
        """‖g‖ over the whole model, every element counted once: replicated grads are identical on all
        ranks after sync; tensor-parallel shards are summed over tp; expert shards over ep (they are
        replicated across expert-dp)."""
        dense, experts = self._split(model)
        sq = lambda ps: sum((p.grad.double().pow(2).sum() for p in ps if p.grad is not None), torch.zeros((), dtype=torch.float64))  # noqa: E731
        tp_sq = sq([p for p in dense if is_tensor_parallel(p)])
        if self.dims.tp > 1:
            dist.all_reduce(tp_sq, group=self.groups.tp)
        expert_sq = sq(experts)
        if self.dims.ep > 1:
            dist.all_reduce(expert_sq, group=self.groups.ep)
        total = float(torch.sqrt(sq([p for p in dense if not is_tensor_parallel(p)]) + tp_sq + expert_sq))
        if max_norm > 0 and math.isfinite(total):
            coef = min(1.0, max_norm / (total + 1e-6))
            if coef < 1.0:
                for p in dense + experts:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return total

    def full_state_dict(self, model: MoETransformer) -> dict[str, torch.Tensor]:
        """The single-process state dict: TP shards gathered over tp, expert shards over ep."""
        state = super().full_state_dict(model)
        if self.dims.tp > 1:
            state = gather_tensor_parallel(model, state, self.groups.tp, self.dims.tp)
        if self.dims.ep == 1:
            return state
        for name in [k for k in state if k.endswith(("gate_up_proj", "down_proj")) and ".experts." in k]:
            parts = [torch.empty_like(state[name]) for _ in range(self.dims.ep)]
            dist.all_gather(parts, state[name].contiguous(), group=self.groups.ep)
            state[name] = torch.cat(parts)
        return state

    def barrier(self) -> None:
        dist.barrier()


def make_runtime(dims: ParallelDims, groups: Groups) -> Runtime:
    return Runtime() if dims.is_single_process else DistributedRuntime(dims, groups)
