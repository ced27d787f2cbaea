"""Grouped top-K router in fp32 with three gradient modes (sparse, ste, ste_ema).

Tested by `python -m pytest tests/model/test_router.py`. See DESIGN.md §5 and docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_MODES = ("sparse", "ste", "ste_ema")


def grouped_topk(scores: torch.Tensor, top_k: int, n_groups: int) -> torch.Tensor:
    """Indices [T, K] of the top-(K/G) experts inside each of G contiguous groups, group by group."""
    t, e = scores.shape
    per_group = top_k // n_groups
    local = scores.view(t, n_groups, e // n_groups).topk(per_group, dim=-1).indices
    offsets = torch.arange(n_groups, device=scores.device).view(1, n_groups, 1) * (e // n_groups)
    return (local + offsets).reshape(t, top_k)


@dataclass
class Routing:
    """What the router decided for T tokens."""

    indices: torch.Tensor
    """[T, K] selected experts."""
    weights: torch.Tensor
    """[T, K] fp32 combine weights; their gradient depends on the mode, their values do not."""
    probs: torch.Tensor
    """[T, E] fp32 full softmax over experts (with gradient)."""
    logits: torch.Tensor
    """[T, E] fp32 router logits (with gradient)."""
    replay_mismatch: float | None = None
    """With replay: share of tokens whose own top-K set differs from the replayed one."""


class GroupedRouter(nn.Module):
    """z = W_r x in fp32, p = softmax(z); selection on p + bias (aux-free bias), weights from p only."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, n_groups: int, mode: str,
                 norm_topk_prob: bool = True) -> None:
        super().__init__()
        if mode not in ROUTER_MODES:
            raise ValueError(f"router mode must be one of {ROUTER_MODES}, got '{mode}'")
        self.num_experts, self.top_k, self.n_groups = num_experts, top_k, n_groups
        self.mode, self.norm_topk_prob = mode, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.register_buffer("selection_bias", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> Routing:
        """Route tokens x [T, H]; `replay` [T, K] forces the given experts (rollout router replay; a row of −1
        leaves that token to the router)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
            probs = logits.softmax(dim=-1)
            scores = probs.detach() + self.selection_bias
            indices = grouped_topk(scores, self.top_k, self.n_groups)
            mismatch = None
            if replay is not None:  # rows of −1 were not recorded (padding): those tokens route freely
                own, replay = indices, replay.to(indices.device)
                recorded = replay[:, 0] >= 0
                differs = (own.sort(-1).values != replay.sort(-1).values).any(-1) & recorded
                mismatch = float(differs.sum() / recorded.sum()) if bool(recorded.any()) else 0.0
                indices = torch.where(recorded[:, None], replay, own)
            selected = probs.gather(1, indices)
            # p_S / Σ p_S equals softmax over the selected logits; written this way the
            # non-selected logits get exactly zero gradient under `sparse`, not rounding residue.
            weights = logits.gather(1, indices).softmax(-1) if self.norm_topk_prob else selected
            if self.mode != "sparse":
                # Straight-through: the value stays w exactly ((p − sg p) is exactly 0), while the
                # gradient reaches the full softmax p_S and so every router row.
                weights = weights.detach() + (selected - selected.detach())
        return Routing(indices=indices, weights=weights, probs=probs, logits=logits, replay_mismatch=mismatch)
