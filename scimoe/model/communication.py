"""What the model asks of its layout, as two small strategy objects, and their one-process versions.

Tested through `python -m pytest tests/model` (local) and `tests/distributed/test_parity.py` (the parallel
versions, built by `scimoe.parallel.parallelize`). The model never talks to process groups: each MoE block
holds one `MoECommunication` and the transformer one `TextCommunication`; on one process every call is the
identity (or the plain computation), in a parallel layout the same calls exchange what the layout needs.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from scimoe.model.moe.dispatch import Dispatched, LocalDispatcher


class TextCommunication(Protocol):
    """The residual stream's sequence shards (sequence parallelism) and the LM loss (vocabulary shards)."""

    def split_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, h] → this rank's positions [b, s/n, h]."""

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's positions → the whole sequence."""

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of next-token cross-entropy over positions with labels != −100."""

    def target_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) [..] over the whole vocabulary (with gradient) and the entropy [..] (without)."""

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (they may be held in vocabulary shards)."""


class MoECommunication(Protocol):
    """Everything an MoE block exchanges: which tokens it routes, where they are computed, and the sums its
    balance terms need."""

    share_parts: int
    """Ranks that hold the same tokens and each route a contiguous 1/share_parts of them."""

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor: ...
    def split_sequence(self, y: torch.Tensor) -> torch.Tensor: ...

    def own_share(self, tokens: torch.Tensor, replay: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of flat tokens [T, H] to route, and the replayed experts of those tokens, given for
        whole sequences as [B, S, K]."""

    def all_shares(self, y: torch.Tensor) -> torch.Tensor:
        """Every rank's share of the block's output, back in token order."""

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> Dispatched:
        """Token copies sorted by (this rank's) expert."""

    def expert_outputs(self, out: torch.Tensor) -> torch.Tensor:
        """The experts' outputs from this rank's computation (sums the shards of expert tensor parallelism)."""

    def combine(self, out: torch.Tensor, weights: torch.Tensor, sent: Dispatched) -> torch.Tensor:
        """Expert outputs back to their tokens, weighted and summed."""

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank holding distinct tokens of the step (balance counts, loads)."""

    def reduce_sequence_stats(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks holding other positions of the same sequences (sequence parallelism)."""


class LocalText:
    """One process: whole sequences, the whole vocabulary."""

    def split_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    def target_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp_all = logits.float().log_softmax(-1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class LocalMoE(LocalDispatcher):
    """One process: every token routed here, every expert here, nothing to sum."""

    share_parts = 1

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def split_sequence(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def own_share(self, tokens, replay):
        return tokens, (replay.reshape(-1, replay.shape[-1]) if replay is not None else None)

    def all_shares(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def expert_outputs(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_sequence_stats(self, t: torch.Tensor) -> torch.Tensor:
        return t
