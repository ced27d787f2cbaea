"""The communication a training step needs after the backward: gradient sync, the global gradient norm and
clipping, ZeRO-1's parameter split, and gathering full weights. Functions of (model, dims), nothing else.

Tested by `python -m pytest tests/distributed/test_parity.py` (every layout's losses, grad norms and weights
against one process; the grad-norm launch on hand-made gradients). Every loss term is a rank's share of a
global-batch sum (scimoe/model/moe/losses.py, scimoe/train/step.py), so gradients are SUMMED, not averaged:
dense ones over dp, expert ones over expert-dp (each expert shard already got the gradient of every token of
its ep group).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from scimoe.model import MoETransformer
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.expert import expert_parameters
from scimoe.parallel.grad_buckets import GradBuckets, param_grad, private_group
from scimoe.parallel.tensor import gather_tensor_parallel, is_tensor_parallel, partial_grad_parameters


def _all_reduce_grads(params: list[torch.nn.Parameter], group) -> None:
    grads = [g for g in map(param_grad, params) if g is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def split_dense_and_experts(model: MoETransformer, dims: ParallelDims) -> tuple[list, list]:
    """(dense, expert-sharded) parameters. Without ep the experts are replicated like dense weights,
    reduced over dp (plus tp under sequence parallelism); megatron's expert-dp group, which spans tp, must
    not be used for them."""
    experts = {id(p) for p in expert_parameters(model)} if dims.ep > 1 else set()
    params = list(model.parameters())
    return [p for p in params if id(p) not in experts], [p for p in params if id(p) in experts]


def optimizer_shards(model: MoETransformer, dims: ParallelDims, zero: int) -> list | None:
    """[(params, group)] for ZeRO-1 sharding (dense over dp, experts over expert-dp); None = one plain
    optimizer (ZeRO off, or nothing to shard over)."""
    if zero == 0 or dims.is_single_process:
        return None
    dense, experts = split_dense_and_experts(model, dims)
    return [(dense, dims.groups.dp if dims.dp > 1 else None),
            (experts, dims.groups.expert_dp if dims.expert_dp > 1 else None)]


def master_shards(model: MoETransformer, dims: ParallelDims, zero: int) -> list:
    """[(params, group or None)] for scimoe/train/master.py: dense weights shared over dp, expert shards over
    expert-dp; None where nothing is sharded (one process, a group of one, or ZeRO off)."""
    dense, experts = split_dense_and_experts(model, dims)
    if dims.is_single_process:
        return [(dense + experts, None)]
    shard = lambda size, group: group if zero and size > 1 else None  # noqa: E731
    return [(dense, shard(dims.dp, dims.groups.dp)), (experts, shard(dims.expert_dp, dims.groups.expert_dp))]


def make_grad_buckets(model: MoETransformer, dims: ParallelDims, bucket_mb: float, overlap: bool,
                      mixed: bool = False, dtype: torch.dtype = torch.float32):
    """`model`'s data-parallel gradient buckets (dense weights over dp, expert shards over expert-dp;
    scimoe/parallel/grad_buckets.py) if its layout sums gradients over such ranks, or always under mixed
    precision (`mixed`: `param.main_grad` in `dtype`, accumulated there on one process too); else None. The
    caller (the session) holds them and hands them to each step. Every rank calls this, in the same order (the
    buckets make their own communicators). Call once the parameters are on their device."""
    dense, experts = split_dense_and_experts(model, dims)
    groups = []
    if not dims.is_single_process:
        named = [("dp", dense, dims.dp), ("expert_dp", experts, dims.expert_dp)]
        everyone = dims.all_gather_object([tuple(dist.get_process_group_ranks(getattr(dims.groups, name)))
                                           for name, _, _ in named])
        for i, (name, params, size) in enumerate(named):
            if params and size > 1:
                groups.append((params, private_group(getattr(dims.groups, name), [e[i] for e in everyone],
                                                          dims.collective_timeout_s)))
            elif params and mixed:
                groups.append((params, None))
    elif mixed:
        groups = [(dense + experts, None)]
    return GradBuckets(groups, int(bucket_mb * 2**20), overlap, dtype, main_grad=mixed) if groups else None


def sync_grads(model: MoETransformer, dims: ParallelDims, buckets=None) -> None:
    """Sum every gradient over the ranks that computed a part of it: the `buckets`' data-parallel sums first
    (started during the backward), then the tensor- and pipeline-parallel ones."""
    bucketed = buckets is not None
    if bucketed:
        buckets.finish()
    if dims.is_single_process:
        return
    g = dims.groups
    dense, experts = split_dense_and_experts(model, dims)
    if dims.sp:  # every replicated weight saw only this rank's positions ...
        moe_params = {id(p) for moe in model.moe_layers() for p in moe.parameters()} \
            if dims.moe_gathers_sequence else set()  # ... but MoE blocks that gathered them saw them all
        _all_reduce_grads([p for p in dense if not is_tensor_parallel(p) and id(p) not in moe_params], g.tp)
    elif dims.tp > 1:
        _all_reduce_grads(partial_grad_parameters(model, dims), g.tp)
    if dims.pp > 1:  # the FoPE tables serve layers on every stage
        _all_reduce_grads(list(model.rotary.parameters()), g.pp)
    if dims.dp > 1 and not bucketed:
        _all_reduce_grads(dense, g.dp)
    if experts and dims.expert_dp > 1 and not bucketed:
        _all_reduce_grads(experts, g.expert_dp)
    if dims.pp > 1:
        # Each stage's dp sum ran over a different flat buffer and may round the FoPE grads differently;
        # stage 0's copy keeps every stage's tables bit-identical (a checkpoint stores one copy).
        for p in model.rotary.parameters():
            if param_grad(p) is not None:
                dist.broadcast(param_grad(p), group=g.pp, group_src=0)


def clip_grad_norm(model: MoETransformer, dims: ParallelDims, max_norm: float, buckets=None) -> float:
    """‖g‖ over the whole model, every element counted once, and the gradients scaled to `max_norm` (0: no
    clipping). Replicated grads are identical on all ranks after sync; tensor-parallel shards are summed over
    tp, expert shards over ep (they are replicated across expert-dp), stages over pp (the shared FoPE tables
    counted on stage 0 only)."""
    if dims.is_single_process:
        if buckets is None or not buckets.main_grad:
            params = [p for p in model.parameters() if p.grad is not None]
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
        grads = [g for g in map(param_grad, model.parameters()) if g is not None]  # what clip_grad_norm_ does
        total = torch.nn.utils.get_total_norm(grads)
        if max_norm > 0:
            torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return float(total)
    dense, experts = split_dense_and_experts(model, dims)
    if dims.pp > 1 and dims.groups.pp_rank > 0:
        shared = {id(p) for p in model.rotary.parameters()}
        dense = [p for p in dense if id(p) not in shared]

    def sq(params) -> torch.Tensor:
        return torch.tensor(sum(float(g.double().pow(2).sum()) for g in map(param_grad, params) if g is not None),
                            dtype=torch.float64)

    split_over_tp = lambda p: is_tensor_parallel(p) or getattr(p, "expert_tensor_parallel", False)  # noqa: E731
    tp_sq = dims.reduce_sum(sq([p for p in dense if split_over_tp(p)]), over="tp")  # etp shards differ per tp rank
    expert_sq = dims.reduce_sum(sq(experts), over="ep") if dims.ep > 1 else sq(experts)
    if experts and dims.etp > 1:
        expert_sq = dims.reduce_sum(expert_sq, over="etp")
    stage_sq = dims.reduce_sum(sq([p for p in dense if not split_over_tp(p)]) + tp_sq + expert_sq, over="pp")
    total = float(torch.sqrt(stage_sq))
    if max_norm > 0 and math.isfinite(total):
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for g in map(param_grad, model.parameters()):
                if g is not None:
                    g.mul_(coef)
    return total


def full_state_dict(model: MoETransformer, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """The single-process state dict: TP shards gathered over tp, expert shards over etp and ep, stages over pp."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    if dims.is_single_process:
        return state
    g = dims.groups
    if dims.tp > 1:
        state = gather_tensor_parallel(model, state, dims)
    expert_names = [k for k in state if k.endswith(("gate_up_proj", "down_proj")) and ".experts." in k]
    if dims.etp > 1:  # each rank holds an F/etp slice of every expert: gate and up halves, down columns
        for name in expert_names:
            parts = [torch.empty_like(state[name]) for _ in range(dims.etp)]
            dist.all_gather(parts, state[name].contiguous(), group=g.etp)
            if name.endswith("down_proj"):
                state[name] = torch.cat(parts, dim=2)
            else:
                halves = [p.chunk(2, dim=1) for p in parts]
                state[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)
    if dims.ep > 1:
        for name in expert_names:
            parts = [torch.empty_like(state[name]) for _ in range(dims.ep)]
            dist.all_gather(parts, state[name].contiguous(), group=g.ep)
            state[name] = torch.cat(parts)
    if dims.pp > 1:
        state = {k: v for stage_state in dims.all_gather_object(state, over="pp") for k, v in stage_state.items()}
    return state
