"""AdamW with decoupled decay on matrices only, optionally ZeRO-1 sharded, and the LR schedule.

Tested by `python -m pytest tests/train/test_optim.py tests/distributed`. The learning rate is a pure
function of the step and the schedule's length (`lr_at`), set before every update; the length is kept in each
checkpoint (scimoe/train/session.py), so resuming needs no other scheduler state.
ZeRO-1 uses torch's ZeroRedundancyOptimizer: dense weights' AdamW state is sharded over the dp group
and expert weights' over the expert-dp group (docs/design.md says why not megatron's or DeepSpeed's).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from scimoe.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, biases and the FoPE mixing matrices (near-identity by design) do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "rotary" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig, length: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then `train.schedule` over a schedule of
    `length` steps (default train.decay_steps, else train.steps); min_lr after its end (lr for `constant`)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    total = length or cfg.decay_steps or cfg.steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay = max(1, round(cfg.decay_fraction * total))
        progress = min(max(step - (total - decay) + 1, 0) / decay, 1.0)  # the schedule's last step: min_lr
        remaining = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                     "sqrt": 1 - math.sqrt(progress)}[cfg.decay_shape]
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining
    progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class OptimizerSet:
    """One or more optimizers (dense / expert shards) stepped together as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.lr = optimizers[0].param_groups[0]["lr"] if optimizers else 0.0
        """The learning rate of the current step."""

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        """The AdamW instances stepping this rank's parameters (ZeRO's inner one when sharded)."""
        return [getattr(opt, "optim", opt) for opt in self.optimizers]

    def owned_parameters(self) -> list[nn.Parameter]:
        """Parameters whose optimizer state lives on this rank."""
        return [p for opt in self.local_optimizers() for g in opt.param_groups for p in g["params"]]

    def parameter_states(self) -> list[tuple[nn.Parameter, dict[str, torch.Tensor]]]:
        """(parameter, its AdamW state: step, exp_avg, exp_avg_sq) for every owned parameter with state."""
        return [(p, opt.state[p]) for opt in self.local_optimizers() for g in opt.param_groups
                for p in g["params"] if opt.state.get(p)]

    def set_parameter_state(self, param: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
        for opt in self.local_optimizers():
            if any(param is p for g in opt.param_groups for p in g["params"]):
                opt.state[param] = state
                return
        raise KeyError("parameter is not stepped by this rank's optimizer")


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    shards: list[tuple[list[nn.Parameter], object]] | None = None) -> OptimizerSet:
    """AdamW over `model`; `shards` = [(params, process group or None)] asks for ZeRO-1 per group."""
    kwargs = dict(lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    if not shards:
        return OptimizerSet([torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)])
    from torch.distributed.optim import ZeroRedundancyOptimizer

    optimizers = []
    for params, group in shards:
        members = {id(p) for p in params}
        groups = [dict(g, params=[p for p in g["params"] if id(p) in members]) for g in param_groups(model, cfg.weight_decay)]
        groups = [g for g in groups if g["params"]]
        if not groups:
            continue
        if group is None:
            optimizers.append(torch.optim.AdamW(groups, **kwargs))
        else:
            zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, process_group=group,
                                           weight_decay=groups[0]["weight_decay"], **kwargs)
            for extra in groups[1:]:
                zero.add_param_group(extra)
            optimizers.append(zero)
    return OptimizerSet(optimizers)
