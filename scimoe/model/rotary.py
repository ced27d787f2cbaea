"""Rotary position embeddings: plain RoPE and FoPE (Fourier position embedding, arXiv 2412.17739).

Tested by `python -m pytest tests/model/test_rotary.py`. Both produce (cos, sin) tables of shape
[B, T, H_kv, d] that `apply_rotary` applies as x·cos + rotate_half(x)·sin; query heads share the
table of their KV head (GQA grouping: query head i uses KV head i // (H / H_kv)).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """ω_i = 1 / θ^(2i/d) for i < d/2, in float32 and in the order of operations of the released Intern-S1-Pro
    (and transformers') code, so that the tables agree to the last bit."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def kept_frequency_count(head_dim: int, theta: float, max_positions: int) -> int:
    """FoPE keeps the frequencies whose period fits in the trained context: ω_i > 2π / L_max."""
    return int((inverse_frequencies(head_dim, theta, "cpu") > 2.0 * math.pi / max_positions).sum())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, d] with tables [B, T, H_kv, d]; H must be a multiple of H_kv."""
    b, t, h, d = x.shape
    h_kv = cos.shape[2]
    xg = x.float().view(b, t, h_kv, h // h_kv, d)
    out = xg * cos.unsqueeze(3) + rotate_half(xg) * sin.unsqueeze(3)
    return out.view(b, t, h, d).to(x.dtype)


class RoPE(nn.Module):
    """Standard rotary embedding; the same table for every head."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta), persistent=False)

    @torch.no_grad()
    def reset_frequencies(self) -> None:
        self.inv_freq.copy_(inverse_frequencies(self.head_dim, self.theta))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)
        return angles.cos(), angles.sin()


class FoPE(nn.Module):
    """Fourier position embedding as the released Intern-S1-Pro computes it: learned mixing of the kept
    frequencies, per KV head.

    cos' = cos(ω·m)·C_h and sin' = sin(ω·m)·S_h over the D kept frequencies; the clipped slots (too low to
    complete a period within L_max) of both cos' and sin' are the constant 1, as in the released modeling code
    and XTuner (vLLM pads sin with 0; the released weights were trained with 1); the half-width table is then
    duplicated to width d as in RoPE. C and S start as I + xavier_normal_(gain=init_factor) of the whole
    [H_kv, D, D] tensor and are buffers (fixed, saved) unless `trainable`.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, n_kv_heads: int,
                 init_factor: float = 0.5, sep_head: bool = True, trainable: bool = False) -> None:
        super().__init__()
        self.half = head_dim // 2
        self.kept = kept_frequency_count(head_dim, theta, max_positions)
        self.init_factor, self.sep_head, self.head_dim, self.theta = init_factor, sep_head, head_dim, theta
        n_tables = n_kv_heads if sep_head else 1
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta)[: self.kept], persistent=False)
        for name in ("cos_coef", "sin_coef"):
            table = torch.empty(n_tables, self.kept, self.kept)
            if trainable:
                setattr(self, name, nn.Parameter(table))
            else:
                self.register_buffer(name, table)
        self.reset_parameters()

    @torch.no_grad()
    def reset_frequencies(self) -> None:
        self.inv_freq.copy_(inverse_frequencies(self.head_dim, self.theta)[: self.kept])

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """C_h, S_h = I + xavier_normal_(gain=init_factor) of the [H_kv, D, D] tensor ([D, D] when shared),
        the released initialisation: std = gain·sqrt(2 / (fan_in + fan_out)), ≈ 0.015 at the real sizes."""
        for coef in (self.cos_coef, self.sin_coef):
            shape = coef.shape if self.sep_head else coef.shape[1:]
            fan_in = shape[1] * (shape[2] if len(shape) > 2 else 1)
            fan_out = shape[0] * (shape[2] if len(shape) > 2 else 1)
            std = self.init_factor * math.sqrt(2.0 / max(fan_in + fan_out, 1))
            noise = torch.randn(coef.shape, generator=generator, device=coef.device) * std
            coef.copy_(torch.eye(self.kept, device=coef.device) + noise)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, D]
        cos = torch.einsum("btd,hde->bthe", angles.cos(), self.cos_coef.float())
        sin = torch.einsum("btd,hde->bthe", angles.sin(), self.sin_coef.float())
        clipped = self.half - self.kept
        if clipped:
            shape = (*cos.shape[:-1], clipped)
            cos = torch.cat((cos, cos.new_ones(shape)), dim=-1)
            sin = torch.cat((sin, sin.new_ones(shape)), dim=-1)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
