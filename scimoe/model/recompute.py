"""Activation recomputation (`train.recompute`): a block's intermediates are freed after the forward and computed
again in the backward, with bitwise the same gradients.

Tested by `python -m pytest tests/model/test_recompute.py tests/distributed/test_recompute_parity.py`; measured by
`python benchmarks/memory_modes.py`.

`full` recomputes whole decoder layers (only the layer's input stays saved), `selective` the attention core (the
softmax over q·kᵀ) and the experts' SwiGLU (gate/up projections and their product, the largest activations of a
MoE layer). PyTorch's non-reentrant `torch.utils.checkpoint` does the work; why not megatron-core's or
DeepSpeed's is in docs/design.md. Early stopping is off, so a recomputed layer runs every collective it ran in
the forward, on every rank alike. State a forward changes (the MoE layer's routed-load and STE-EMA sums) is
changed once: `recomputing()` is true while a block runs again.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

MODES = ("none", "selective", "full")
_depth = 0


@contextlib.contextmanager
def _again():
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def recomputing() -> bool:
    """True while a checkpointed block runs a second time (in the backward)."""
    return _depth > 0


def _contexts():
    return contextlib.nullcontext(), _again()


def recomputed(fn, *args):
    """fn(*args), keeping only `args` for the backward, which runs fn again. Plain fn(*args) without autograd."""
    if not torch.is_grad_enabled():
        return fn(*args)
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
