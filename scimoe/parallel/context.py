"""Context parallelism's communication: this rank's chunks of each row, and the row's keys and values gathered
from the cp ranks for attention (scimoe/model/context.py has the model's side and the chunking).

Tested by `python -m pytest tests/distributed/test_parity.py` (cp2, cp2×tp2 with and without SP, cp2×ep2,
cp2×pp2 against one process; resuming across cp sizes) and tests/distributed/test_multimodal_parity.py (cp2). Why an all-gather of K/V rather than a ring or an all-to-all over heads
is in docs/design.md ("Context parallelism").
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from scimoe.model.context import ContextDocuments, chunk_indices, row_order
from scimoe.parallel.dims import ParallelDims


class _GatherRow(torch.autograd.Function):
    """[B, T/cp, …] this rank's chunks → [B, T, …] the whole row in row order. Backward: the row's gradient summed
    over the cp ranks (each attended to these keys from its own queries), this rank's chunks of it."""

    @staticmethod
    def forward(ctx, x, group, cp, rank):  # noqa: D102
        ctx.group, ctx.cp, ctx.rank = group, cp, rank
        pieces = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(pieces, x.contiguous(), group=group)  # a list: gloo has no all_gather_into_tensor
        length = x.shape[1] * cp
        return torch.cat(pieces, dim=1).index_select(1, row_order(length, cp, x.device))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce_scatter; the row is 1/cp of a layer's K/V
        return grad.index_select(1, chunk_indices(grad.shape[1], ctx.cp, ctx.rank, grad.device)), None, None, None


class ParallelContext:
    """The model's context object (scimoe/model/context.py's LocalContext) for cp > 1."""

    def __init__(self, dims: ParallelDims) -> None:
        self.dims, self.cp, self.rank, self.group = dims, dims.cp, dims.groups.cp_rank, dims.groups.cp

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return self.dims.context_share(x)

    def gather_row(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherRow.apply(x, self.group, self.cp, self.rank)

    def documents(self, positions: torch.Tensor) -> ContextDocuments:
        return ContextDocuments.build(positions, self.cp, self.rank, self.gather_row)
