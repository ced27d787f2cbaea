"""Time-series encoder (Intern-S1-Pro, DESIGN.md §5): a signal [L, C] sampled at `sr` Hz becomes
⌈·⌉ ≈ L / (4·stride) LM-width vectors for the `<|ts_pad|>` positions.

Tested by `python -m pytest tests/model/test_timeseries.py`. Steps:
1. adaptive subsampling: stride = ⌊160 / (1 + e^(−sr/100))^6⌋ (2 at yearly to ~1 Hz rates, 160 at kHz),
   patch = 2·stride, patches every `stride` samples (overlapping by half; the tail is zero-padded);
2. per patch and channel: a strided conv over the patch's samples and a small transformer over its
   positions, mean over positions and over channels → one vector per patch (so a C-channel signal's
   patch vectors are the mean of its channels' own: channels are exchangeable);
3. Whisper-style: conv (k3) + GELU, conv (k3, stride 2) + GELU (halves the length), sinusoidal positions,
   transformer layers, applied to windows of `window` frames so attention stays bounded;
4. projector: adjacent frame pairs concatenated → MLP → LM width (halves again).
Long signals are processed in chunks of patches (step 2) and windows (step 3), so peak memory is set
by the chunk sizes, not the signal length (10^6 points measured in the test).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scimoe.config import TimeSeriesModelConfig


def ts_stride(sampling_rate: float) -> int:
    """Samples between patch starts for a signal sampled at `sampling_rate` Hz."""
    if not sampling_rate > 0:
        raise ValueError(f"sampling rate must be > 0, got {sampling_rate}")
    return max(1, math.floor(160 / (1 + math.exp(-sampling_rate / 100)) ** 6))


def ts_patch_count(length: int, sampling_rate: float) -> int:
    stride = ts_stride(sampling_rate)
    return max(1, math.ceil(max(length - stride, 1) / stride))


def ts_token_count(length: int, sampling_rate: float, window: int = 1500) -> int:
    """LM tokens a signal of `length` samples becomes (windows of `window` frames encoded separately)."""
    patches = ts_patch_count(length, sampling_rate)
    frames = [min(window, patches - s) for s in range(0, patches, window)]  # windows of patch frames
    return sum(math.ceil(math.ceil(f / 2) / 2) for f in frames)


TimeSeriesConfig = TimeSeriesModelConfig
"""The encoder's sizes are `model.timeseries` (scimoe/config.py)."""


def _sinusoids(length: int, dim: int, device) -> torch.Tensor:
    half = dim // 2
    scale = torch.exp(-math.log(10000.0) * torch.arange(half, device=device) / max(half - 1, 1))
    angles = torch.arange(length, device=device)[:, None] * scale[None]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


class PatchEncoder(nn.Module):
    """One patch of one channel (2·stride samples) → a vector, independent of the patch length."""

    def __init__(self, cfg: TimeSeriesConfig) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, cfg.patch_hidden, kernel_size=4, stride=2, padding=1)
        layer = nn.TransformerEncoderLayer(cfg.patch_hidden, max(1, cfg.patch_hidden // 16), 2 * cfg.patch_hidden,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.patch_layers, enable_nested_tensor=False)
        self.out = nn.Linear(cfg.patch_hidden, cfg.hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, P] → [N, hidden]."""
        h = F.gelu(self.conv(patches[:, None, :])).transpose(1, 2)  # [N, P/2, patch_hidden]
        return self.out(self.encoder(h).mean(dim=1))


class TimeSeriesEncoder(nn.Module):
    def __init__(self, cfg: TimeSeriesConfig, lm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch = PatchEncoder(cfg)
        self.conv1 = nn.Conv1d(cfg.hidden, cfg.hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.hidden, cfg.hidden, kernel_size=3, stride=2, padding=1)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, 4 * cfg.hidden, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.projector = nn.Sequential(nn.Linear(2 * cfg.hidden, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden))

    def patch_vectors(self, signal: torch.Tensor, sampling_rate: float) -> torch.Tensor:
        """signal [L, C] → [patches, hidden]: every channel's patches encoded, then averaged over channels."""
        length, channels = signal.shape
        stride = ts_stride(sampling_rate)
        count = ts_patch_count(length, sampling_rate)
        need = (count - 1) * stride + 2 * stride
        padded = F.pad(signal.float(), (0, 0, 0, need - length))  # zero tail
        positions = stride  # the conv halves the 2·stride samples of a patch
        heads = max(1, self.cfg.patch_hidden // 16)
        chunk = max(1, self.cfg.chunk_elements // (channels * heads * positions * positions))
        out = []
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            window = padded[start * stride: (start + n - 1) * stride + 2 * stride]  # [*, C]
            patches = window.T.unfold(1, 2 * stride, stride)  # [C, n, 2·stride]
            vectors = self.patch(patches.reshape(channels * n, 2 * stride)).view(channels, n, -1)
            out.append(vectors.mean(dim=0))
        return torch.cat(out)

    def frames(self, vectors: torch.Tensor) -> torch.Tensor:
        """[patches, hidden] → [⌈patches/2⌉, hidden] per window of `window` frames."""
        out = []
        for start in range(0, len(vectors), self.cfg.window):
            x = vectors[start: start + self.cfg.window].T[None]  # [1, hidden, n]
            x = F.gelu(self.conv2(F.gelu(self.conv1(x))))[0].T  # [⌈n/2⌉, hidden]
            x = x + _sinusoids(len(x), x.shape[1], x.device)
            x = self.norm(self.encoder(x[None]))[0]
            if len(x) % 2:
                x = torch.cat((x, torch.zeros_like(x[:1])))
            out.append(self.projector(x.reshape(len(x) // 2, -1)))
        return torch.cat(out)

    def forward(self, signal: torch.Tensor, sampling_rate: float) -> torch.Tensor:
        """signal [L] or [L, C] → [ts_token_count(L, sr), lm_hidden]."""
        if signal.dim() == 1:
            signal = signal[:, None]
        if signal.dim() != 2 or signal.shape[0] < 1 or signal.shape[1] < 1:
            raise ValueError(f"a time series must be [length, channels] with both ≥ 1, got {list(signal.shape)}")
        if not bool(torch.isfinite(signal).all()):
            raise ValueError("a time series has NaN or Inf values")
        return self.frames(self.patch_vectors(signal, sampling_rate))
