"""Autograd-aware collectives the parallel layouts are made of: shares of a tensor over a group, and
megatron's copy / reduce regions.

Tested through `python -m pytest tests/distributed/test_parity.py` (every tp, SP and etp layout uses them).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _Split(torch.autograd.Function):
    """Rows (along `dim`) → this rank's contiguous share; backward all-gathers the shares' gradients."""

    @staticmethod
    def forward(ctx, x, group, rank, parts, dim):  # noqa: D102
        ctx.group, ctx.parts, ctx.dim = group, parts, dim
        return x.chunk(parts, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return gather_along(grad.contiguous(), ctx.group, ctx.parts, ctx.dim), None, None, None, None


class _Gather(torch.autograd.Function):
    """Shares → the whole tensor along `dim`; backward keeps this rank's share of the gradient, which
    must already be complete on every rank (replicated downstream, or all-reduced by megatron's
    column-parallel backward)."""

    @staticmethod
    def forward(ctx, x, group, rank, parts, dim):  # noqa: D102
        ctx.rank, ctx.parts, ctx.dim = rank, parts, dim
        return gather_along(x.contiguous(), group, parts, dim)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.chunk(ctx.parts, dim=ctx.dim)[ctx.rank].contiguous(), None, None, None, None


def gather_along(x: torch.Tensor, group, parts: int, dim: int) -> torch.Tensor:
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


class SumOverGroup(torch.autograd.Function):
    """Forward: sum over the group (the partial outputs of an expert split over etp). Backward: identity
    (each rank's shard needs the full upstream gradient), as megatron's reduce_from_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


class CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: sum over the group (each etp rank's shard gives part of dL/dx), as
    megatron's copy_to_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None
