"""Vision encoder, Qwen3-VL style (DESIGN.md §5): any image size in, one LM-width vector per 32×32 pixels out.

Tested by `python -m pytest tests/model/test_vision.py`. An image [3, H, W] (H, W multiples of 32: see
`native_size`) is repeated to 2 frames (temporal patch 2) and cut into 16×16 patches by a Conv3d; a
learned 48×48 position grid is resized bilinearly to the image's patch grid and added; transformer blocks
(LayerNorm, fused qkv attention with 2-D rotary positions: half of each head's rotary pairs follow the
row, half the column; GELU MLP); then every 2×2 block of patches is concatenated and an MLP merger maps
it to the LM width. Images are encoded one at a time: no fixed tiling, no padding between images.
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
INTERN_S1_PRO_VISION = VisionModelConfig(enabled=True, hidden=1024, layers=24, heads=16, mlp=4096, grid=48)


def native_size(height: int, width: int, min_pixels: int = 32 * 32, max_pixels: int = 1024 * 1024) -> tuple[int, int]:
    """The size an image is resized to: multiples of 32 (patch × merge), aspect ratio kept, pixel count
    within [min_pixels, max_pixels] (Qwen-VL's smart resize)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}×{width}")
    unit = PATCH * MERGE
    h, w = max(unit, round(height / unit) * unit), max(unit, round(width / unit) * unit)
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
    quarter = head_dim // 4
    inv = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=rows.device) / quarter))
    angles = torch.cat((rows[:, None] * inv, cols[:, None] * inv), dim=1)  # [N, head_dim/2]
    angles = torch.cat((angles, angles), dim=1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-6), nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.linear_fc1, self.linear_fc2 = nn.Linear(cfg.hidden, cfg.mlp), nn.Linear(cfg.mlp, cfg.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.heads, d // self.heads).unbind(1)
        q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        x = x + self.proj(out.transpose(0, 1).reshape(n, d))
        return x + self.linear_fc2(F.gelu(self.linear_fc1(self.norm2(x)), approximate="tanh"))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, lm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv3d(3, cfg.hidden, kernel_size=(TEMPORAL, PATCH, PATCH), stride=(TEMPORAL, PATCH, PATCH))
        self.pos_embed = nn.Parameter(torch.randn(cfg.grid, cfg.grid, cfg.hidden) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        merged = cfg.hidden * MERGE * MERGE
        self.merger = nn.Sequential(nn.LayerNorm(merged, eps=1e-6), nn.Linear(merged, merged), nn.GELU(),
                                    nn.Linear(merged, lm_hidden))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image [3, H, W] (H, W multiples of 32, values normalised) → [H·W / 32², lm_hidden]."""
        if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] % 32 or image.shape[2] % 32:
            raise ValueError(f"an image must be [3, H, W] with H and W multiples of 32, got {list(image.shape)}")
        frames = image[:, None].expand(3, TEMPORAL, *image.shape[1:]).float()
        x = self.patch_embed(frames[None])[0, :, 0]  # [hidden, h, w]
        h, w = x.shape[1:]
        pos = F.interpolate(self.pos_embed.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        x = (x + pos).permute(1, 2, 0)  # [h, w, hidden]
        # Order patches so that each 2×2 merge group is contiguous: (h/2, w/2, 2, 2).
        x = x.view(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
        grid = grid.view(h // 2, 2, w // 2, 2, 2).permute(0, 2, 1, 3, 4).reshape(h * w, 2).to(x.device)
        cos, sin = _rotary_2d(grid[:, 0].float(), grid[:, 1].float(), x.shape[1] // self.cfg.heads)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.merger(x.reshape(h * w // 4, -1))
