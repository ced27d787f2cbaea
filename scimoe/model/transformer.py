"""The decoder-only MoE language model (Intern-S1-Pro text tower), plain PyTorch.

Build one: `build_model(ModelConfig())` (the tiny preset) or on the meta device for counting:
`with torch.device("meta"): build_model(cfg)`. Tested by `python -m pytest tests/model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from scimoe.config import ModelConfig
from scimoe.model.communication import LocalText, MoECommunication, TextCommunication
from scimoe.model.attention import Attention
from scimoe.model.context import LocalContext
from scimoe.model.recompute import MODES, recomputed
from scimoe.model.moe.experts import GroupedExperts, SwiGLU
from scimoe.model.moe.layer import MoEAux, MoELayer
from scimoe.model.norm import RMSNorm
from scimoe.model.timeseries import TimeSeriesEncoder
from scimoe.model.vision import VisionEncoder
from scimoe.model.rotary import FoPE, RoPE


@dataclass
class ModelOutput:
    """Forward results for one micro-batch."""

    logits: torch.Tensor
    """[B, T, V] (dtype of the compute)."""
    loss_sum: torch.Tensor
    """Sum of next-token cross-entropy over label positions (0 when no labels)."""
    label_tokens: int
    """Positions with a label (labels != −100)."""
    balance_loss: torch.Tensor
    """Weighted balance terms summed over MoE layers."""
    z_loss: torch.Tensor
    """Weighted z-loss summed over MoE layers."""
    moe: list[MoEAux] = field(default_factory=list)
    """Per-MoE-layer statistics, in layer order."""


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(·)) with an MoE or dense SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, dense: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.moe.dense_ffn_hidden) if dense else MoELayer(cfg.hidden, cfg.moe)
        self.comm: TextCommunication = LocalText()
        """With sequence parallelism the residual stream, norms and MLP hold s/tp positions; attention
        gathers them all (see MoETransformer.use_communication)."""
        self.recompute = "none"
        """`full`: keep only the layer's input for the backward and run the layer again there; `selective`: the
        attention core and the experts' SwiGLU only (scimoe/model/recompute.py)."""

    def set_recompute(self, mode: str) -> None:
        self.recompute = mode
        self.self_attn.recompute_core = mode == "selective"
        if isinstance(self.mlp, MoELayer):
            self.mlp.experts.recompute = mode == "selective"

    def forward(self, x, rotary, docs, replay=None, cache=None) -> tuple[torch.Tensor, MoEAux | None]:
        if self.recompute == "full" and cache is None:
            return recomputed(self._forward, x, rotary, docs, replay, None)
        return self._forward(x, rotary, docs, replay, cache)

    def _forward(self, x, rotary, docs, replay, cache) -> tuple[torch.Tensor, MoEAux | None]:
        h = self.comm.gather_sequence(self.input_layernorm(x))
        x = x + self.comm.split_sequence(self.self_attn(h, rotary, docs, cache))
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoELayer):
            y, aux = self.mlp(h, replay)
            return x + y, aux
        return x + self.mlp(h), None


class MoETransformer(nn.Module):
    """Embedding → decoder layers → final norm → untied LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        if cfg.pos_emb == "fope":
            self.rotary = FoPE(cfg.head_dim, cfg.rope_theta, cfg.max_positions, cfg.kv_heads,
                               cfg.fope_init_factor, cfg.fope_sep_head, cfg.fope_trainable)
        else:
            self.rotary = RoPE(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dense=i < cfg.moe.dense_layers) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.vision = self.timeseries = None
        if cfg.vision.enabled:
            v = cfg.vision
            self.vision = VisionEncoder(v, cfg.hidden)
            self.vision.requires_grad_(not v.freeze)
        if cfg.timeseries.enabled:
            t = cfg.timeseries
            self.timeseries = TimeSeriesEncoder(t, cfg.hidden)
            self.timeseries.requires_grad_(not t.freeze)
        self.comm: TextCommunication = LocalText()
        """Sequence shards and the LM loss; scimoe.parallel hands in tensor-parallel ones."""
        self.context = LocalContext()
        """Which positions of each row this rank holds and how attention reaches the others' keys (context
        parallelism, scimoe/model/context.py; scimoe.parallel hands in the cp version)."""

    def use_communication(self, text: TextCommunication, moe: Callable[[MoELayer], MoECommunication]) -> None:
        """Install a layout's communication: `text` for the residual stream and the loss (every layer),
        `moe(layer)` for each MoE block. Called once, by scimoe.parallel.parallelize."""
        self.comm = text
        for layer in self.layers:
            if isinstance(layer, DecoderLayer):
                layer.comm = text
                if isinstance(layer.mlp, MoELayer):
                    layer.mlp.comm = moe(layer.mlp)

    def set_recompute(self, mode: str, layers: list[int] | None = None) -> None:
        """Activation recomputation `mode` (none, selective, full) for decoder `layers` (None: all; the others get
        none); see scimoe/model/recompute.py."""
        if mode not in MODES:
            raise ValueError(f"recompute mode must be one of {MODES}, got '{mode}'")
        chosen = set(range(len(self.layers)) if layers is None else layers)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, DecoderLayer):  # a pipeline stage holds placeholders for the others' layers
                layer.set_recompute(mode if i in chosen else "none")

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic initialisation from `seed` alone (independent of the global RNG)."""
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.startswith(("vision.", "timeseries.")):
                continue  # below, module by module
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.fill_(1.0)
            elif "rotary" in name:
                continue
            else:
                scale = self.cfg.embed_init_std if name == "embed_tokens.weight" else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
                if self.cfg.zero_init_output and name.endswith(("o_proj.weight", "down_proj.weight", "down_proj", "lm_head.weight")):
                    p.zero_()
        if isinstance(self.rotary, FoPE):
            self.rotary.reset_parameters(gen)
        for encoder in (self.vision, self.timeseries):
            for module in encoder.modules() if encoder is not None else []:
                if isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv3d)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):  # learned position tables
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                elif isinstance(module, nn.MultiheadAttention):
                    module.in_proj_weight.copy_(torch.randn(module.in_proj_weight.shape, generator=gen) * std)
                    module.in_proj_bias.zero_()
        for buf_name, buf in self.named_buffers():
            if buf_name.endswith(("expert_output_ema", "selection_bias", "load_since_update")):
                buf.zero_()

    @torch.no_grad()
    def reset_computed_buffers(self) -> None:
        """Refill the buffers that are computed rather than saved (rotary frequencies, the MoE layers' per-step
        counters): after the model was materialised from the meta device."""
        self.rotary.reset_frequencies()
        for moe in self.moe_layers():
            moe.discard_step()

    def moe_layers(self) -> list[MoELayer]:
        # A pipeline stage replaces the layers it does not run with placeholders (no `mlp`).
        return [layer.mlp for layer in self.layers if isinstance(getattr(layer, "mlp", None), MoELayer)]

    def embed(self, input_ids: torch.Tensor, images: list[torch.Tensor] | None = None,
              series: list[tuple[torch.Tensor, float]] | None = None) -> torch.Tensor:
        """Token embeddings with `<|image_pad|>` / `<|ts_pad|>` positions replaced, in order of appearance
        (row by row), by the encoders' outputs for `images` ([3, H, W]) and `series` ((values, rate))."""
        x = self.embed_tokens(input_ids)
        for encoder, items, token, name in ((self.vision, images, self.cfg.image_token_id, "image"),
                                            (self.timeseries, series, self.cfg.ts_token_id, "time-series")):
            if encoder is None:  # a text-only model: the placeholder ids are ordinary tokens
                if items:
                    raise ValueError(f"the batch has {name} inputs but model."
                                     f"{'vision' if name == 'image' else 'timeseries'}.enabled is false")
                continue
            slots = input_ids == token
            frozen = not any(p.requires_grad for p in encoder.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                vectors = torch.cat([encoder(*(item if isinstance(item, tuple) else (item,))) for item in items or []]
                                    or [x.new_zeros(0, x.shape[-1])])
            if len(vectors) != int(slots.sum()):
                raise ValueError(f"{int(slots.sum())} {name} placeholder tokens but the encoder produced {len(vectors)} vectors")
            x = x.masked_scatter(slots.unsqueeze(-1), vectors.to(x.dtype))
        return x

    def embed_local(self, input_ids: torch.Tensor, images=None, series=None) -> torch.Tensor:
        """`embed` of whole rows, cut to the positions this rank holds (its context chunks, its sequence shard)."""
        return self.comm.split_sequence(self.context.split(self.embed(input_ids, images, series)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor | None = None,
                replay: list[torch.Tensor] | None = None, kv_cache: list[dict] | None = None,
                images: list[torch.Tensor] | None = None, series: list[tuple[torch.Tensor, float]] | None = None) -> ModelOutput:
        """`kv_cache` (generation, one dict per layer): see Attention.forward. `images`, `series`: see embed."""
        x = self.embed_local(input_ids, images, series)
        x, auxes = self.run_layers(x, positions, range(len(self.layers)), replay, kv_cache=kv_cache)
        logits, loss_sum, label_tokens = self.output(x, labels)
        zero = loss_sum.new_zeros(())
        return ModelOutput(
            logits=logits, loss_sum=loss_sum, label_tokens=label_tokens,
            balance_loss=sum((a.balance_loss for a in auxes), zero),
            z_loss=sum((a.z_loss for a in auxes), zero), moe=auxes)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, layer_ids: range,
                   replay: list[torch.Tensor] | None = None,
                   aux_grad_scale: float | None = None, kv_cache: list[dict] | None = None) -> tuple[torch.Tensor, list[MoEAux]]:
        """Decoder layers `layer_ids` (a pipeline stage runs its own range).

        `replay[j]` forces the experts of the j-th MoE layer of the whole model. With `aux_grad_scale`
        each MoE layer's balance and z terms are attached to the hidden states, so their gradient (times
        the scale) flows in the backward of the activations; pipeline stages need this because only the
        last stage owns the loss. `positions` are those of whole rows, `x` this rank's part of them."""
        rotary = self.rotary(self.context.split(positions))
        docs = self.context.documents(positions)
        auxes: list[MoEAux] = []
        for i in layer_ids:
            moe_index = i - min(i, self.cfg.moe.dense_layers)
            x, aux = self.layers[i](x, rotary, docs, replay[moe_index] if replay is not None else None,
                                    kv_cache[i] if kv_cache is not None else None)
            if aux is not None:
                auxes.append(aux)
                if aux_grad_scale is not None:
                    x = _AttachLoss.apply(x, (aux.balance_loss + aux.z_loss) * aux_grad_scale)
        return x, auxes

    def output(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Final norm and LM head; (logits, sum of token losses, label count) over this rank's positions of
        whole-row `labels`."""
        logits = self.lm_head(self.comm.gather_sequence(self.norm(x)))
        loss_sum, label_tokens = logits.new_zeros((), dtype=torch.float32), 0
        if labels is not None:
            labels = self.context.split(labels)
            loss_sum = self.comm.loss_sum(logits, labels)
            label_tokens = int((labels != -100).sum())
        return logits, loss_sum, label_tokens


class _AttachLoss(torch.autograd.Function):
    """Identity on x whose backward also sends gradient 1 into `loss` (Megatron's aux-loss trick)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, torch.ones(ctx.loss_shape, dtype=torch.float32, device=grad.device)


def build_model(cfg: ModelConfig, seed: int | None = None) -> MoETransformer:
    """The model for `cfg`; initialised from `seed` unless built on the meta device."""
    model = MoETransformer(cfg)
    if seed is not None:
        model.init_weights(seed)
    return model


__all__ = ["MoETransformer", "ModelOutput", "build_model", "GroupedExperts"]
