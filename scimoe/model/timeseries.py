"""Time-series encoder, structurally LMDeploy's Intern-S1-Pro tower (DESIGN.md §5): a signal [L, C] sampled at
`sr` Hz becomes ts_token_count(L, sr) LM-width vectors for the `<|ts_pad|>` positions, under the release's
weight names (`model.time_series.*` in a Hugging Face folder).

Tested by `python -m pytest tests/model/test_timeseries.py tests/model/test_released_model.py`. Steps, as LMDeploy
computes them:
1. adaptive patches: stride = ⌊160 / (1 + e^(−sr/100))^6⌋ (in float32), patch = 2·stride,
   n = ⌈(L − patch) / stride⌉ + 1 patches, the tail zero-padded;
2. `encoder_embed`, per patch: its [patch, C] samples are read as C rows of `patch` values (LMDeploy reshapes
   without transposing, so for C > 1 the rows interleave channels: kept as released), conv (k5) + ReLU,
   fixed sinusoidal positions, a post-norm transformer layer, mean over positions and then over the C rows;
   pairs of patch vectors concatenated (an odd last one dropped);
3. `encoder`, Whisper-style: a linear map to `mel_bins` channels, conv (k3) + GELU, conv (k3, stride 2) +
   GELU, learned positions (none past max_source_positions), causal pre-norm layers, LayerNorm, a linear map;
4. `projector`: LayerNorm, linear, activation, linear to the LM width.
Step 2 is computed in chunks of patches, so peak memory is set by `chunk_elements`, not the signal length
(10^6 points measured in the test); LMDeploy's preprocessor cuts series at 240,000 samples
(`model.timeseries.max_samples`, applied by the data pipeline).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scimoe.config import TimeSeriesModelConfig

TimeSeriesConfig = TimeSeriesModelConfig
"""The encoder's sizes are `model.timeseries` (scimoe/config.py)."""
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def ts_stride(sampling_rate: float) -> int:
    """Samples between patch starts for a signal sampled at `sampling_rate` Hz (float32, as released)."""
    if not sampling_rate > 0:
        raise ValueError(f"sampling rate must be > 0, got {sampling_rate}")
    sr = torch.tensor(sampling_rate, dtype=torch.float32)
    return int(torch.floor(160 / ((1 + torch.exp(-sr / 100)) ** 6)))


def ts_patch_count(length: int, sampling_rate: float) -> int:
    """Patches of a `length`-sample signal: ⌈(L − 2·stride) / stride⌉ + 1."""
    stride = ts_stride(sampling_rate)
    return math.ceil((length - 2 * stride) / stride) + 1


def ts_token_count(length: int, sampling_rate: float) -> int:
    """LM tokens a signal of `length` samples becomes: (⌊patches / 2⌋ + 1) // 2 (0: too short for the tower)."""
    patches = ts_patch_count(length, sampling_rate)
    return max(0, (patches // 2 + 1) // 2)


def _sinusoids(length: int, dim: int) -> torch.Tensor:
    """[length, 1, dim] sine on even and cosine on odd channels, as LMDeploy's fixed positional encoding."""
    position = torch.arange(length, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
    return table.unsqueeze(1)


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int = 20_000) -> None:
        super().__init__()
        self.register_buffer("pe", _sinusoids(max_len, dim), persistent=True)  # saved, as released


class PatchEmbedding(nn.Module):
    """Step 2: every patch to a vector, pairs of patch vectors concatenated."""

    def __init__(self, cfg: TimeSeriesConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv1d(1, cfg.embed_hidden, kernel_size=5, stride=1, padding=2)
        layer = nn.TransformerEncoderLayer(cfg.embed_hidden, cfg.embed_heads, cfg.embed_ffn, dropout=0.0)
        self.transformer_encoder = nn.TransformerEncoder(layer, cfg.embed_layers, enable_nested_tensor=False)
        self.pos_encoder = PositionalEncoding(cfg.embed_hidden)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """[n, patch, C] → [n, embed_hidden]."""
        n, length, channels = patches.shape
        x = F.relu(self.conv(patches.reshape(n * channels, 1, length)))  # LMDeploy's reshape, kept as is
        x = x.permute(2, 0, 1) + self.pos_encoder.pe[:length]  # [patch, n·C, hidden]
        return self.transformer_encoder(x).mean(0).reshape(n, channels, -1).mean(1)

    def forward(self, signal: torch.Tensor, sampling_rate: float) -> torch.Tensor:
        """signal [L, C] → [⌊n/2⌋, 2·embed_hidden]."""
        length, channels = signal.shape
        stride = ts_stride(sampling_rate)
        count = ts_patch_count(length, sampling_rate)
        padded = F.pad(signal.float(), (0, 0, 0, (count - 1) * stride + 2 * stride - length))
        heads = self.cfg.embed_heads
        chunk = max(1, self.cfg.chunk_elements // (channels * heads * 4 * stride * stride))
        x = padded.new_empty(count, self.cfg.embed_hidden)  # filled chunk by chunk: no pile of small tensors
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            window = padded[start * stride: (start + n - 1) * stride + 2 * stride]
            x[start:start + n] = self.encode(window.unfold(0, 2 * stride, stride).transpose(1, 2))  # [n, patch, C]
        x = x[: count // 2 * 2]
        return torch.cat((x[0::2], x[1::2]), dim=1)


class WhisperAttention(nn.Module):
    """Causal (as LMDeploy's encoder is) multi-head attention; queries in blocks of at most `chunk_elements`
    scores, so memory stays linear in the frames (each block sees the keys up to its own end: exact)."""

    def __init__(self, dim: int, heads: int, chunk_elements: int) -> None:
        super().__init__()
        self.heads, self.chunk_elements = heads, chunk_elements
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        q, k, v = (proj(x).view(t, self.heads, -1).transpose(0, 1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        rows = max(1, self.chunk_elements // (self.heads * t))
        if rows >= t:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            blocks = []
            for start in range(0, t, rows):
                end = min(t, start + rows)
                mask = torch.arange(end, device=x.device)[None] <= torch.arange(start, end, device=x.device)[:, None]
                blocks.append(F.scaled_dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], attn_mask=mask))
            out = torch.cat(blocks, dim=1)
        return self.out_proj(out.transpose(0, 1).reshape(t, d))


class WhisperLayer(nn.Module):
    def __init__(self, cfg: TimeSeriesConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.self_attn = WhisperAttention(cfg.hidden, cfg.heads, cfg.chunk_elements)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(cfg.hidden, cfg.ffn), nn.Linear(cfg.ffn, cfg.hidden)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Step 3."""

    def __init__(self, cfg: TimeSeriesConfig) -> None:
        super().__init__()
        self.adapt_in = nn.Linear(2 * cfg.embed_hidden, cfg.mel_bins)
        self.conv1 = nn.Conv1d(cfg.mel_bins, cfg.hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.hidden, cfg.hidden, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.hidden)
        self.layers = nn.ModuleList(WhisperLayer(cfg) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(cfg.hidden, eps=1e-5)
        self.adapt_out = nn.Linear(cfg.hidden, cfg.adapt_out)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        x = self.adapt_in(pairs).T[None]  # [1, mel, frames]
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))[0].T  # [⌈frames/2⌉, hidden]
        positions = self.embed_positions.weight[: len(x)]
        x = torch.cat((x[: len(positions)] + positions, x[len(positions):]))
        for layer in self.layers:
            x = layer(x)
        return self.adapt_out(self.layer_norm(x))


class Projector(nn.Module):
    """Step 4."""

    def __init__(self, cfg: TimeSeriesConfig, lm_hidden: int) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.layer_norm = nn.LayerNorm(cfg.adapt_out, eps=1e-5)
        self.linear_1, self.linear_2 = nn.Linear(cfg.adapt_out, lm_hidden), nn.Linear(lm_hidden, lm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class TimeSeriesEncoder(nn.Module):
    def __init__(self, cfg: TimeSeriesConfig, lm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_embed = PatchEmbedding(cfg)
        self.encoder = WhisperEncoder(cfg)
        self.projector = Projector(cfg, lm_hidden)

    def forward(self, signal: torch.Tensor, sampling_rate: float) -> torch.Tensor:
        """signal [L] or [L, C] → [ts_token_count(L, sr), lm_hidden]."""
        if signal.dim() == 1:
            signal = signal[:, None]
        if signal.dim() != 2 or signal.shape[0] < 1 or signal.shape[1] < 1:
            raise ValueError(f"a time series must be [length, channels] with both ≥ 1, got {list(signal.shape)}")
        if not bool(torch.isfinite(signal).all()):
            raise ValueError("a time series has NaN or Inf values")
        if ts_token_count(signal.shape[0], sampling_rate) < 1:
            raise ValueError(f"a time series of {signal.shape[0]} samples at {sampling_rate} Hz is shorter than the "
                             f"{2 * ts_stride(sampling_rate) + 1} samples that make one token")
        return self.projector(self.encoder(self.encoder_embed(signal, sampling_rate)))
