"""Rotary position embeddings: plain RoPE and FoPE (Fourier position embedding, arXiv 2412.17739).

Tested by `python -m pytest tests/model/test_rotary.py`. Both produce (cos, sin) tables of shape
[B, T, H_kv, d] that `apply_rotary` applies as x·cos + rotate_half(x)·sin; query heads share the
table of their KV head (GQA grouping: query head i uses KV head i // (H / H_kv)).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """ω_i = θ^(−2i/d) for i < d/2 (float64; callers cast)."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def kept_frequency_count(head_dim: int, theta: float, max_positions: int) -> int:
    """FoPE keeps the frequencies whose period fits in the trained context: ω_i > 2π / L_max."""
    return sum(theta ** (-i / head_dim) > 2 * math.pi / max_positions for i in range(0, head_dim, 2))


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
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta).float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)
        return angles.cos(), angles.sin()


class FoPE(nn.Module):
    """Fourier position embedding: learned mixing of the kept frequencies, per KV head.

    cos' = cos(ω·m)·C_h and sin' = sin(ω·m)·S_h over the D kept frequencies; the clipped (too low to
    complete a period within L_max) slots become frequency zero, i.e. cos 1 and sin 0, so they carry
    no position; the half-width table is then duplicated to width d as in RoPE.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, n_kv_heads: int,
                 init_factor: float = 0.5, sep_head: bool = True) -> None:
        super().__init__()
        self.half = head_dim // 2
        self.kept = kept_frequency_count(head_dim, theta, max_positions)
        self.init_factor = init_factor
        n_tables = n_kv_heads if sep_head else 1
        omega = inverse_frequencies(head_dim, theta)[: self.kept].float()
        self.register_buffer("inv_freq", omega, persistent=False)
        self.cos_coef = nn.Parameter(torch.empty(n_tables, self.kept, self.kept))
        self.sin_coef = nn.Parameter(torch.empty(n_tables, self.kept, self.kept))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """C_h, S_h = I + XavierNormal(gain=init_factor), i.e. noise std = gain·sqrt(1/D)."""
        std = self.init_factor * (1.0 / max(self.kept, 1)) ** 0.5
        for coef in (self.cos_coef, self.sin_coef):
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
            sin = torch.cat((sin, sin.new_zeros(shape)), dim=-1)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
