"""One optimizer step: gradient accumulation over micro-batches, clipping, loss guard, update.

Tested by `python -m pytest tests/train`. The LM loss is the mean over every label token of the
global batch (each micro-batch contributes its token sum / global token count), so the result does
not depend on how the batch is cut into micro-batches; balance terms are averaged over micro-batches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from scimoe.model import MoETransformer


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


def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, microbatches: list[dict[str, torch.Tensor]],
               grad_clip: float, dtype: str = "fp32") -> StepResult:
    """Forward/backward every micro-batch, clip, and step the optimizer unless the step is non-finite."""
    model.train()
    label_tokens = sum(int((mb["labels"] != -100).sum()) for mb in microbatches)
    n_micro = len(microbatches)
    lm_sum = balance = z = 0.0
    counts: list[torch.Tensor] = []
    entropy: list[float] = []
    for mb in microbatches:
        with autocast_context(dtype):
            out = model(mb["input_ids"], mb["positions"], mb["labels"])
        loss = out.loss_sum / max(label_tokens, 1) + (out.balance_loss + out.z_loss) / n_micro
        loss.backward()
        lm_sum += float(out.loss_sum.detach())
        balance += float(out.balance_loss.detach()) / n_micro
        z += float(out.z_loss.detach()) / n_micro
        if not counts:
            counts = [torch.zeros_like(a.counts) for a in out.moe]
            entropy = [0.0] * len(out.moe)
        for i, aux in enumerate(out.moe):
            counts[i] += aux.counts
            entropy[i] += float(aux.entropy) / n_micro
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
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
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=total, lm_loss=lm_loss, balance_loss=balance, z_loss=z, grad_norm=grad_norm,
                      tokens=sum(mb["input_ids"].numel() for mb in microbatches), skipped=skipped,
                      expert_counts=counts, router_entropy=entropy)
