"""One optimizer step: gradient accumulation over micro-batches, clipping, loss guard, update.

Tested by `python -m pytest tests/train tests/distributed`. The LM loss is the mean over every label
token of the global batch (each micro-batch contributes its token sum / global token count), so the
result does not depend on how the batch is cut into micro-batches or ranks; balance terms are
averaged over micro-batches. Each rank's loss is its share of the global one: the runtime sums
gradients and logged values over data-parallel ranks.
"""
from __future__ import annotations

import contextlib
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
    router_entropy: list[float] = field(default_factory=list)


def autocast_context(dtype: str):
    """bf16 autocast (CPU or GPU); fp32 runs without autocast."""
    if dtype == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: MoETransformer, optimizer, microbatches: list[dict[str, torch.Tensor]],
               grad_clip: float, dtype: str = "fp32", runtime: Runtime | None = None) -> StepResult:
    """Forward/backward every micro-batch, sync and clip gradients, and step unless non-finite."""
    runtime = runtime or Runtime()
    model.train()
    local_labels = sum(int((mb["labels"] != -100).sum()) for mb in microbatches)
    label_tokens = int(runtime.reduce_sum(torch.tensor(local_labels)))
    n_micro = len(microbatches)
    totals = torch.zeros(3, dtype=torch.float64)  # lm sum, balance, z (this rank's shares)
    counts: list[torch.Tensor] = []
    entropy: list[float] = []
    for mb in microbatches:
        with autocast_context(dtype):
            out = model(mb["input_ids"], mb["positions"], mb["labels"])
        loss = out.loss_sum / max(label_tokens, 1) + (out.balance_loss + out.z_loss) / n_micro
        loss.backward()
        totals += torch.stack([out.loss_sum.detach(), out.balance_loss.detach() / n_micro,
                               out.z_loss.detach() / n_micro]).double()
        if not counts:
            counts = [torch.zeros_like(a.counts) for a in out.moe]
            entropy = [0.0] * len(out.moe)
        for i, aux in enumerate(out.moe):
            counts[i] += aux.counts
            entropy[i] += float(aux.entropy) / n_micro
    runtime.sync_grads(model)
    grad_norm = runtime.clip_grad_norm(model, grad_clip)
    lm_sum, balance, z = runtime.reduce_sum(totals).tolist()
    lm_loss = lm_sum / max(label_tokens, 1)
    total = lm_loss + balance + z
    skipped = not (math.isfinite(total) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        for moe in model.moe_layers():
            moe.update_selection_bias()
    else:
        for moe in model.moe_layers():
            moe.load_since_update.zero_()
    optimizer.zero_grad()
    counts = [runtime.reduce_sum(c) for c in counts]
    tokens = int(runtime.reduce_sum(torch.tensor(sum(mb["input_ids"].numel() for mb in microbatches))))
    return StepResult(loss=total, lm_loss=lm_loss, balance_loss=balance, z_loss=z, grad_norm=grad_norm,
                      tokens=tokens, skipped=skipped, expert_counts=counts, router_entropy=entropy)
