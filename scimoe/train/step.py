"""One optimizer step: gradient accumulation over micro-batches, clipping, loss guard, update.

Tested by `python -m pytest tests/train tests/distributed`. The LM loss is the mean over every label
token of the global batch (each micro-batch contributes its token sum / global token count), so the
result does not depend on how the batch is cut into micro-batches or ranks; balance terms are
averaged over micro-batches. Each rank's loss is its share of the global one: the runtime sums
gradients and logged values over data-parallel ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from scimoe.model import MoETransformer
from scimoe.parallel.runtime import Runtime


@dataclass
class StepResult:
    """What one optimizer step measured (all Python numbers)."""

    loss: float
    lm_loss: float
    balance_loss: float
    z_loss: float
    grad_norm: float
    tokens: int
    skipped: bool
    expert_counts: list[torch.Tensor] = field(default_factory=list)
    layer_stats: list[torch.Tensor] = field(default_factory=list)
    """Per MoE layer, float64 [router entropy, balance loss, z-loss, bias drift] (MoEAux.layer_stats)."""


def apply_update(model: MoETransformer, optimizer, runtime: Runtime, grad_clip: float, loss: float) -> tuple[float, bool]:
    """After the backward: sync and clip gradients, then the loss guard: step (and commit the MoE layers'
    per-step state) unless `loss` (already the same on every rank) or the global grad norm is not finite.
    Returns (grad norm, skipped)."""
    runtime.sync_grads(model)
    grad_norm = runtime.clip_grad_norm(model, grad_clip)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    for moe in model.moe_layers():
        moe.discard_step() if skipped else moe.commit_step()
    optimizer.zero_grad()
    return grad_norm, skipped


def train_step(model: MoETransformer, optimizer, microbatches: list[dict[str, torch.Tensor]],
               grad_clip: float, dtype: str = "fp32", runtime: Runtime | None = None) -> StepResult:
    """Forward/backward every micro-batch, sync and clip gradients, and step unless non-finite."""
    runtime = runtime or Runtime()
    model.train()
    local_labels = sum(int((mb["labels"] != -100).sum()) for mb in microbatches)
    label_tokens = int(runtime.reduce_sum(torch.tensor(local_labels)))
    totals, counts, stats = runtime.forward_backward(model, microbatches, label_tokens, dtype)
    lm_sum, balance, z = runtime.reduce_sum(totals).tolist()
    lm_loss = lm_sum / max(label_tokens, 1)
    total = lm_loss + balance + z
    grad_norm, skipped = apply_update(model, optimizer, runtime, grad_clip, total)
    counts = [runtime.reduce_sum(c) for c in counts]
    dp = runtime.dims.dp  # entropy and bias drift: mean over dp ranks; balance and z: shares of a sum
    stats = [runtime.reduce_sum(s) * torch.tensor([1.0 / dp, 1.0, 1.0, 1.0 / dp], dtype=torch.float64) for s in stats]
    tokens = int(runtime.reduce_sum(torch.tensor(sum(mb["input_ids"].numel() for mb in microbatches))))
    return StepResult(loss=total, lm_loss=lm_loss, balance_loss=balance, z_loss=z, grad_norm=grad_norm,
                      tokens=tokens, skipped=skipped, expert_counts=counts, layer_stats=stats)
