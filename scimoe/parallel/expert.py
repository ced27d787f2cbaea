"""Expert parallelism: experts sharded over the ep group, dropless all-to-all dispatch and combine.

Tested by `tests/distributed/test_parity.py` (layouts ep2, ep4, ep2×dp2 against one process) and
`tests/distributed/test_dispatch.py` (skewed routing, a rank that receives no token). Token counts are
exchanged first, then token rows with uneven splits through the autograd-aware all_to_all_single.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from scimoe.model import MoETransformer
from scimoe.model.moe.dispatch import Dispatched, weighted_sum_by_token


@dataclass
class ExpertParallelDispatched(Dispatched):
    """Rows received for this rank's experts, plus what is needed to send results back."""

    perm: torch.Tensor = None  # received-row index of each local-expert-sorted row
    send_splits: list[int] = None
    recv_splits: list[int] = None


class ExpertParallelDispatcher:
    """Global expert e lives on ep rank e // (E / ep); each rank runs its E/ep experts on all tokens
    routed to them from the whole ep group."""

    def __init__(self, num_experts: int, group, ep_rank: int, ep_size: int) -> None:
        self.num_experts, self.group, self.ep_rank, self.ep_size = num_experts, group, ep_rank, ep_size
        self.local = num_experts // ep_size

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> ExpertParallelDispatched:
        flat = indices.flatten()
        order = torch.argsort(flat, stable=True)  # by global expert, hence by destination rank
        send_counts = torch.bincount(flat, minlength=self.num_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [source rank, local expert]
        recv_counts = recv_counts.view(self.ep_size, self.local)
        send_splits = send_counts.view(self.ep_size, self.local).sum(-1).tolist()
        recv_splits = recv_counts.sum(-1).tolist()
        rows = x[order // indices.shape[1]]
        received = all_to_all_single(rows.new_empty(sum(recv_splits), x.shape[-1]), rows,
                                     recv_splits, send_splits, group=self.group)
        local_ids = torch.repeat_interleave(torch.arange(self.local, device=x.device).repeat(self.ep_size),
                                            recv_counts.flatten())
        perm = torch.argsort(local_ids, stable=True)
        return ExpertParallelDispatched(
            x=received[perm], counts=recv_counts.sum(0), expert_ids=local_ids[perm] + self.ep_rank * self.local,
            order=order, perm=perm, send_splits=send_splits, recv_splits=recv_splits)

    def combine(self, out: torch.Tensor, weights: torch.Tensor, sent: ExpertParallelDispatched) -> torch.Tensor:
        back = torch.empty_like(out).index_copy(0, sent.perm, out)  # to received order
        returned = all_to_all_single(out.new_empty(sum(sent.send_splits), out.shape[-1]), back,
                                     sent.send_splits, sent.recv_splits, group=self.group)
        return weighted_sum_by_token(returned, weights, sent.order)


class _Split(torch.autograd.Function):
    """Rows (along `dim`) → this rank's contiguous share; backward all-gathers the shares' gradients."""

    @staticmethod
    def forward(ctx, x, group, rank, parts, dim):  # noqa: D102
        ctx.group, ctx.parts, ctx.dim = group, parts, dim
        return x.chunk(parts, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _gather(grad.contiguous(), ctx.group, ctx.parts, ctx.dim), None, None, None, None


class _Gather(torch.autograd.Function):
    """Shares → the whole tensor along `dim`; backward keeps this rank's share of the gradient, which
    must already be complete on every rank (replicated downstream, or all-reduced by megatron's
    column-parallel backward)."""

    @staticmethod
    def forward(ctx, x, group, rank, parts, dim):  # noqa: D102
        ctx.rank, ctx.parts, ctx.dim = rank, parts, dim
        return _gather(x.contiguous(), group, parts, dim)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.chunk(ctx.parts, dim=ctx.dim)[ctx.rank].contiguous(), None, None, None, None


def _gather(x: torch.Tensor, group, parts: int, dim: int) -> torch.Tensor:
    pieces = [torch.empty_like(x) for _ in range(parts)]
    dist.all_gather(pieces, x, group=group)  # a list: gloo has no all_gather_into_tensor
    return torch.cat(pieces, dim=dim)


class TokenSplit:
    """Shares of a tensor over the tensor-parallel group along `dim`.

    dim 0 of flat tokens: megatron's tp × ep layout (tp ranks hold the same tokens, so each routes and
    dispatches only its 1/tp share and the MoE outputs are gathered back). dim 1 of [b, s, h]:
    sequence parallelism (each tp rank keeps s/tp positions of the residual stream)."""

    def __init__(self, group, rank: int, parts: int, dim: int = 0) -> None:
        self.group, self.rank, self.parts, self.dim = group, rank, parts, dim

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return _Split.apply(x, self.group, self.rank, self.parts, self.dim)

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(y, self.group, self.rank, self.parts, self.dim)


def apply_expert_parallel(model: MoETransformer, group, ep_rank: int, ep_size: int) -> None:
    """Keep this rank's slice of every MoE layer's experts and route tokens through the ep group."""
    if ep_size == 1:
        return
    for moe in model.moe_layers():
        experts = moe.experts
        local = experts.num_experts // ep_size
        keep = slice(ep_rank * local, (ep_rank + 1) * local)
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach()[keep].clone())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.detach()[keep].clone())
        experts.num_experts = local
        moe.dispatcher = ExpertParallelDispatcher(experts.num_experts * ep_size, group, ep_rank, ep_size)


class _SumOverGroup(torch.autograd.Function):
    """Forward: sum over the group (the partial outputs of an expert split over etp). Backward: identity
    (each rank's shard needs the full upstream gradient), as megatron's reduce_from_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        out = x.contiguous().clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: sum over the group (each etp rank's shard gives part of dL/dx), as
    megatron's copy_to_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out = grad.contiguous().clone()
        torch.distributed.all_reduce(out, group=ctx.group)
        return out, None


def apply_expert_tensor_parallel(model: MoETransformer, group, etp_rank: int, etp_size: int) -> None:
    """Split every expert's hidden width F over the etp ranks: gate and up rows (column-parallel), down's
    columns (row-parallel); the experts' partial outputs are summed over the group before the combine."""
    if etp_size == 1:
        return
    for moe in model.moe_layers():
        experts = moe.experts
        f = experts.down_proj.shape[2]
        if f % etp_size:
            raise ValueError(f"model.moe.ffn_hidden ({f}) must be divisible by parallel.etp ({etp_size})")
        part = slice(etp_rank * f // etp_size, (etp_rank + 1) * f // etp_size)
        gate, up = experts.gate_up_proj.detach().split(f, dim=1)
        experts.gate_up_proj = torch.nn.Parameter(torch.cat([gate[:, part], up[:, part]], dim=1).clone())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.detach()[:, :, part].clone())
        for p in experts.parameters():
            p.expert_tensor_parallel = True
        moe.expert_input_copy = lambda x, group=group: _CopyToGroup.apply(x, group)
        moe.expert_output_reduce = lambda y, group=group: _SumOverGroup.apply(y, group)


def expert_parameters(model: MoETransformer) -> list[torch.nn.Parameter]:
    """Parameters sharded over ep (reduced over expert-dp); everything else is dense (reduced over dp)."""
    return [p for moe in model.moe_layers() for p in moe.experts.parameters()]
