"""Vision encoder, structurally the released Intern-S1-Pro one (Qwen3-VL-MoE's tower; DESIGN.md §5): any image
size in, one LM-width vector per 32×32 pixels out, under the released weight names.

Tested by `python -m pytest tests/model/test_vision.py tests/model/test_released_model.py` (the latter against
numbers from the released code). An image [3, H, W] (H, W multiples of 32: see `native_size`) is repeated to 2
frames (temporal patch 2) and cut into 16×16 patches (`patch_embed.proj`, a Conv3d); the learned position
table (`pos_embed`, an embedding of grid² rows) is interpolated bilinearly to the image's patch grid as the
release does (row and column indices from linspace(0, grid − 1, n)); blocks of LayerNorm, fused-qkv attention
with 2-D rotary positions (half of each head's rotary pairs follow the row, half the column) and a tanh-GELU
MLP; then the merger normalises each patch, concatenates every 2×2 block and maps it to the LM width.
Images are encoded one at a time: no fixed tiling, no padding between images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scimoe.config import VisionModelConfig

PATCH, TEMPORAL, MERGE = 16, 2, 2


VisionConfig = VisionModelConfig
"""The encoder's sizes are `model.vision` (scimoe/config.py)."""
INTERN_S1_PRO_VISION = VisionModelConfig(enabled=True, hidden=1024, layers=24, heads=16, mlp=4096, grid=48,
                                         min_pixels=65536, max_pixels=16777216)


def native_size(height: int, width: int, min_pixels: int = 32 * 32, max_pixels: int = 1024 * 1024) -> tuple[int, int]:
    """The size an image is resized to, as the released processor computes it (Qwen2-VL's `smart_resize` with a
    factor of 32, patch × merge): each side rounded to a multiple of 32 (a side of 16 px or less rounds to 0 and
    is then scaled up with the other), pixel count brought within [min_pixels, max_pixels], aspect ratio kept.
    An image more than 200 times longer than wide is refused, as the release refuses it."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}×{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an aspect ratio over 200 is refused (as the released processor refuses it), got "
                         f"{height}×{width}")
    unit = PATCH * MERGE
    h, w = round(height / unit) * unit, round(width / unit) * unit
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h, w = max(unit, math.floor(height / scale / unit) * unit), max(unit, math.floor(width / scale / unit) * unit)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / unit) * unit, math.ceil(width * scale / unit) * unit
    return h, w


def image_token_count(height: int, width: int) -> int:
    """LM tokens of an image already at its native size."""
    return (height // (PATCH * MERGE)) * (width // (PATCH * MERGE))


def _rotary_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    dim = head_dim // 2  # half the pairs follow the row, half the column
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float, device=rows.device) / dim))
    angles = torch.cat((rows[:, None] * inv, cols[:, None] * inv), dim=1)  # [N, head_dim/2]
    angles = torch.cat((angles, angles), dim=1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1).float() * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, d // self.heads).unbind(1)
        q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return self.proj(out.transpose(0, 1).reshape(n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1, self.linear_fc2 = nn.Linear(cfg.hidden, cfg.mlp), nn.Linear(cfg.mlp, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-6), nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.attn, self.mlp = VisionAttention(cfg), VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv3d(3, cfg.hidden, kernel_size=(TEMPORAL, PATCH, PATCH), stride=(TEMPORAL, PATCH, PATCH))


class PatchMerger(nn.Module):
    """Each patch normalised, every 2×2 block concatenated, then an MLP to the LM width."""

    def __init__(self, hidden: int, lm_hidden: int) -> None:
        super().__init__()
        merged = hidden * MERGE * MERGE
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.linear_fc1, self.linear_fc2 = nn.Linear(merged, merged), nn.Linear(merged, lm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).reshape(-1, x.shape[-1] * MERGE * MERGE)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, lm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.grid * cfg.grid, cfg.hidden)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.merger = PatchMerger(cfg.hidden, lm_hidden)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The position table interpolated to an h × w patch grid [h, w, hidden]: bilinear between the four
        neighbouring rows, at indices linspace(0, grid − 1, n) (the release's rule)."""
        g = self.cfg.grid
        table = self.pos_embed.weight.view(g, g, -1)
        rows, cols = torch.linspace(0, g - 1, h), torch.linspace(0, g - 1, w)
        r0, c0 = rows.int(), cols.int()
        r1, c1 = (r0 + 1).clip(max=g - 1), (c0 + 1).clip(max=g - 1)
        dr = (rows - r0)[:, None, None].to(table)
        dc = (cols - c0)[None, :, None].to(table)
        r0, r1, c0, c1 = (i.long().to(table.device) for i in (r0, r1, c0, c1))
        dr, dc = dr.to(table.device), dc.to(table.device)
        return (table[r0][:, c0] * (1 - dr) * (1 - dc) + table[r0][:, c1] * (1 - dr) * dc
                + table[r1][:, c0] * dr * (1 - dc) + table[r1][:, c1] * dr * dc)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image [3, H, W] (H, W multiples of 32, values normalised) → [H·W / 32², lm_hidden]."""
        if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] % 32 or image.shape[2] % 32:
            raise ValueError(f"an image must be [3, H, W] with H and W multiples of 32, got {list(image.shape)}")
        weight = self.patch_embed.proj.weight
        frames = image[:, None].expand(3, TEMPORAL, *image.shape[1:]).to(weight.dtype)
        x = self.patch_embed.proj(frames[None])[0, :, 0].permute(1, 2, 0)  # [h, w, hidden]
        h, w = x.shape[:2]
        x = x + self.positions(h, w)
        # Order patches so that each 2×2 merge group is contiguous: (h/2, w/2, 2, 2).
        x = x.view(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
        grid = grid.view(h // 2, 2, w // 2, 2, 2).permute(0, 2, 1, 3, 4).reshape(h * w, 2).to(x.device)
        cos, sin = _rotary_2d(grid[:, 0].float(), grid[:, 1].float(), x.shape[1] // self.cfg.heads)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.merger(x)
