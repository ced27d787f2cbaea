"""Dropless token dispatch on one process: sort token copies by expert, and combine them back.

Tested through `python -m pytest tests/model/test_experts.py tests/model/test_router.py`. The expert-parallel dispatcher in
`scimoe/parallel/` offers the same two calls with an all-to-all in between.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatched:
    """Token copies sorted by expert, plus what combine needs to undo the sort."""

    x: torch.Tensor
    """[T·K, H] token copies, grouped by expert in expert order."""
    counts: torch.Tensor
    """[E] int64 rows per expert in `x`."""
    expert_ids: torch.Tensor
    """[T·K] the expert of each row of `x`."""
    order: torch.Tensor
    """[T·K] flat (token, slot) index of each row of `x`."""


class LocalDispatcher:
    """Every expert lives on this process: a stable sort by expert is the whole dispatch."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> Dispatched:
        flat = indices.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        return Dispatched(x=x[order // indices.shape[1]], counts=counts, expert_ids=flat[order], order=order)

    def combine(self, out: torch.Tensor, weights: torch.Tensor, sent: Dispatched) -> torch.Tensor:
        return weighted_sum_by_token(out, weights, sent.order)


def weighted_sum_by_token(out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_k w_tk · out[(t, k)] for rows of `out` in `order` (flat (token, slot) indices)."""
    t, k = weights.shape
    scaled = out * weights.flatten()[order].to(out.dtype).unsqueeze(-1)
    return out.new_zeros(t, out.shape[-1]).index_add_(0, order // k, scaled)
