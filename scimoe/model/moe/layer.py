"""The MoE block: router → dispatch → grouped SwiGLU experts → combine, plus its balance terms.

Tested by `python -m pytest tests/model/test_experts.py tests/model/test_router.py tests/model/test_balance_losses.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from scimoe.config import MoEConfig
from scimoe.model.moe import losses
from scimoe.model.communication import LocalMoE, MoECommunication
from scimoe.model.moe.experts import GroupedExperts, SwiGLU
from scimoe.model.moe.router import GroupedRouter
from scimoe.model.recompute import recomputing


@dataclass
class MoEAux:
    """One layer's auxiliary outputs for one micro-batch."""

    balance_loss: torch.Tensor
    """Weighted aux + sequence aux + group balance terms (with gradient)."""
    z_loss: torch.Tensor
    """Weighted router z-loss (with gradient)."""
    counts: torch.Tensor
    """[E] tokens per expert (no gradient)."""
    entropy: torch.Tensor
    """Mean router entropy over tokens (no gradient)."""
    indices: torch.Tensor
    """[T, K] chosen experts of every token this rank's block saw (each tp rank's share gathered), for router
    replay and mismatch metrics."""
    bias_abs_max: float = 0.0
    """max |aux-free selection bias| of the layer: how far the bias has drifted from 0."""
    replay_mismatch: float | None = None
    """With router replay: share of tokens the router itself would have sent elsewhere."""

    def layer_stats(self) -> torch.Tensor:
        """float64 [entropy, balance loss, z-loss, bias drift] for metrics (see LAYER_STATS)."""
        return torch.tensor([float(self.entropy), float(self.balance_loss.detach()), float(self.z_loss.detach()),
                             self.bias_abs_max],
                            dtype=torch.float64)


LAYER_STATS = ("router_entropy", "balance_loss", "z_loss", "bias_abs_max")
"""Names of MoEAux.layer_stats' entries."""
LAYER_STAT_MEANS = ("router_entropy", "bias_abs_max")
"""The entries that are means over ranks; the others are each rank's share of a sum."""


def stats_over_ranks(summed: torch.Tensor, ranks: int) -> torch.Tensor:
    """A layer's statistics from their sum over `ranks` ranks: the means divided by `ranks`, the sums as they are."""
    scale = [1.0 / ranks if name in LAYER_STAT_MEANS else 1.0 for name in LAYER_STATS]
    return summed * torch.tensor(scale, dtype=summed.dtype)


class MoELayer(nn.Module):
    """Dropless grouped-routing MoE with optional shared expert."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = GroupedRouter(hidden, cfg.num_experts, cfg.top_k, cfg.n_groups, cfg.router_mode,
                                    cfg.norm_topk_prob)
        self.experts = GroupedExperts(cfg.num_experts, hidden, cfg.ffn_hidden)
        self.shared_expert = SwiGLU(hidden, cfg.shared_expert_ffn) if cfg.shared_expert_ffn else None
        self.comm: MoECommunication = LocalMoE(cfg.num_experts)
        """How tokens reach the experts and statistics are summed; scimoe.parallel hands in a parallel one."""
        self.register_buffer("expert_output_ema", torch.zeros(cfg.num_experts, hidden))
        self.register_buffer("load_since_update", torch.zeros(cfg.num_experts), persistent=False)
        # STE-EMA: expert output sums of this optimizer step, folded into Ê when the step commits.
        self.register_buffer("output_sum_since_update", torch.zeros(cfg.num_experts, hidden) if cfg.router_mode ==
                             "ste_ema" else None, persistent=False)

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """x [B, S, H]; `replay` [B, S', K] forces the experts of every token (S' the whole sequence)."""
        comm = self.comm
        x_all = comm.gather_sequence(x)
        batch, seq, hidden = x_all.shape
        flat = x_all.reshape(-1, hidden)
        tokens, replay = comm.own_share(flat, replay)
        routing = self.router(tokens, replay)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        sent = comm.dispatch(tokens.to(compute_dtype), routing.indices)
        out = comm.expert_outputs(self.experts(sent.x, sent.counts))
        y = comm.combine(out, routing.weights, sent)
        if self.cfg.router_mode == "ste_ema":
            y = y + self._ema_gradient_path(routing).to(y.dtype)
            if self.training and not recomputing():
                self.output_sum_since_update.index_add_(0, sent.expert_ids, out.detach().float())
        y = comm.all_shares(y)
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        routed = torch.bincount(routing.indices.flatten(), minlength=self.cfg.num_experts)
        if self.training and not recomputing():
            self.load_since_update += routed.float()
        aux = self._aux(routing, batch // comm.share_parts, routed, comm.all_shares(routing.indices))
        return comm.split_sequence(y.view(batch, seq, hidden).to(x.dtype)), aux

    def _ema_gradient_path(self, routing) -> torch.Tensor:
        """Σ_{j∉S} (p_j − sg p_j)·Ê_j: exactly zero in value, router gradient ⟨∂L/∂y, Ê_j⟩."""
        probs = routing.probs
        not_selected = torch.ones_like(probs).scatter(1, routing.indices, 0.0)
        return ((probs - probs.detach()) * not_selected) @ self.expert_output_ema

    @torch.no_grad()
    def _update_output_ema(self, load: torch.Tensor) -> None:
        """Ê_j ← d·Ê_j + (1−d)·mean output of expert j over all its tokens of the step (all ranks); idle
        experts keep Ê_j. Once per optimizer step, so a skipped step leaves Ê untouched."""
        sums = self.comm.reduce_stats(self.output_sum_since_update)
        counts = load.unsqueeze(-1)
        decay = self.cfg.ema_decay
        updated = decay * self.expert_output_ema + (1 - decay) * sums / counts.clamp_min(1.0)
        self.expert_output_ema.copy_(torch.where(counts > 0, updated, self.expert_output_ema))

    def _aux(self, routing, batch: int, counts: torch.Tensor, indices: torch.Tensor) -> MoEAux:
        cfg, probs, idx, reduce = self.cfg, routing.probs, routing.indices, self.comm.reduce_stats
        zero = probs.new_zeros(())
        balance = zero
        if cfg.aux_loss_coef:
            balance = balance + cfg.aux_loss_coef * losses.aux_loss(probs, idx, cfg.top_k, reduce)
        if cfg.seq_aux_loss_coef:
            balance = balance + cfg.seq_aux_loss_coef * losses.sequence_aux_loss(
                probs, idx, cfg.top_k, batch, reduce, self.comm.reduce_sequence_stats)
        if cfg.group_balance_coef:
            balance = balance + cfg.group_balance_coef * losses.group_balance_loss(
                probs, idx, cfg.top_k, cfg.n_groups, reduce)
        z = cfg.z_loss_coef * losses.z_loss(routing.logits, reduce) if cfg.z_loss_coef else zero
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        return MoEAux(balance_loss=balance, z_loss=z, counts=counts.detach(), entropy=entropy, indices=indices,
                      bias_abs_max=float(self.router.selection_bias.abs().max()), replay_mismatch=routing.replay_mismatch)

    @torch.no_grad()
    def commit_step(self) -> None:
        """After an optimizer step: aux-loss-free bias and STE-EMA updates from the step's routed loads."""
        if not self.cfg.bias_update_rate and self.output_sum_since_update is None:
            return self.discard_step()
        load = self.comm.reduce_stats(self.load_since_update)
        if self.cfg.bias_update_rate:
            losses.aux_free_bias_update(self.router.selection_bias, load, self.cfg.bias_update_rate)
        if self.output_sum_since_update is not None:
            self._update_output_ema(load)
        self.discard_step()

    @torch.no_grad()
    def discard_step(self) -> None:
        """A skipped (non-finite) step: forget its loads so no state changes."""
        self.load_since_update.zero_()
        if self.output_sum_since_update is not None:
            self.output_sum_since_update.zero_()
