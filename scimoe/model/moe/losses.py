"""Router balance terms: global-batch aux, sequence aux, z-loss, group-level balance, aux-free bias.

Tested by `python -m pytest tests/model/test_balance_losses.py` against hand computations.
Every term is written as this process's share of a global-batch sum: statistics that need the whole
batch (expert counts, token and sequence totals) go through `reduce`, which sums them over the
data-parallel ranks (identity on one process), while probabilities stay local. Summing the shares
(and their gradients) over the ranks gives exactly the single-process loss and gradient. The model
never talks to process groups itself: `reduce` is handed in by scimoe.parallel.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Reduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _reduced(x: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    return x if reduce is None else reduce(x)


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, as fp32 [E]."""
    return torch.bincount(indices.flatten(), minlength=num_experts).float()


def aux_loss(probs: torch.Tensor, indices: torch.Tensor, top_k: int, reduce: Reduce = None) -> torch.Tensor:
    """E/(K·T)·Σ_i c_i·P_i with c_i the tokens sent to expert i and P_i its mean probability (T global)."""
    num_experts = probs.shape[-1]
    counts = _reduced(expert_counts(indices, num_experts), reduce)
    tokens = _reduced(probs.new_tensor(float(probs.shape[0])), reduce)
    return num_experts / (top_k * tokens * tokens) * (counts * probs.sum(0)).sum()


def sequence_aux_loss(probs: torch.Tensor, indices: torch.Tensor, top_k: int, batch: int,
                      reduce: Reduce = None, sequence_reduce: Reduce = None) -> torch.Tensor:
    """The aux form inside each sequence (probs laid out [B·S, E]), averaged over all sequences.

    With sequence parallelism each rank holds S/n positions of its sequences: `sequence_reduce` sums
    the per-sequence counts and lengths over those n ranks, and the sequences counted by `reduce`
    (which then spans them too) are divided by n."""
    t, num_experts = probs.shape
    seq = t // batch
    counts = torch.zeros(batch, num_experts, device=probs.device)
    counts.scatter_add_(1, indices.view(batch, -1), torch.ones_like(indices.view(batch, -1), dtype=torch.float))
    length, shards = probs.new_tensor(float(seq)), probs.new_tensor(1.0)
    if sequence_reduce is not None:
        counts, length, shards = sequence_reduce(counts), sequence_reduce(length), sequence_reduce(shards)
    prob_sums = probs.view(batch, seq, num_experts).sum(1)
    per_seq = num_experts / (top_k * length * length) * (counts * prob_sums).sum(-1)
    return per_seq.sum() * shards / _reduced(probs.new_tensor(float(batch)), reduce)


def z_loss(logits: torch.Tensor, reduce: Reduce = None) -> torch.Tensor:
    """mean_t (logsumexp z_t)² over all tokens: keeps router logits small."""
    tokens = _reduced(logits.new_tensor(float(logits.shape[0])), reduce)
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / tokens


def group_balance_loss(probs: torch.Tensor, indices: torch.Tensor, top_k: int, n_groups: int,
                       reduce: Reduce = None) -> torch.Tensor:
    """The aux form inside each router group with probabilities renormalised within the group,
    averaged over groups; grouped routing already balances groups, this balances experts in them."""
    t, num_experts = probs.shape
    per_group = num_experts // n_groups
    k_group = top_k // n_groups
    grouped = probs.view(t, n_groups, per_group)
    in_group = grouped / grouped.sum(-1, keepdim=True)
    counts = _reduced(expert_counts(indices, num_experts), reduce).view(n_groups, per_group)
    tokens = _reduced(probs.new_tensor(float(t)), reduce)
    per_group_loss = per_group / (k_group * tokens * tokens) * (counts * in_group.sum(0)).sum(-1)
    return per_group_loss.mean()


@torch.no_grad()
def aux_free_bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """b_i ← b_i + u·sign(mean_load − load_i): under-loaded experts become easier to select."""
    bias.add_(rate * torch.sign(load.mean() - load))
