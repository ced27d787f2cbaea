"""Time-series encoder: `python -m pytest tests/model/test_timeseries.py`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from scimoe.model.timeseries import TimeSeriesConfig, TimeSeriesEncoder, ts_stride, ts_token_count

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_stride_follows_the_design_formula_across_sampling_rates():
    # ⌊160 / (1 + e^(−sr/100))^6⌋, by hand: yearly ≈ 3.2e-8 Hz → (1+1)^6 = 64 → 2.5 → 2
    assert ts_stride(1 / (365.25 * 86400)) == 2
    assert ts_stride(1.0) == math.floor(160 / (1 + math.exp(-0.01)) ** 6) == 2
    assert ts_stride(100.0) == math.floor(160 / (1 + math.exp(-1)) ** 6) == 24
    assert ts_stride(1000.0) == 159 and ts_stride(1e5) == 160
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sampling rate must be > 0"):
            ts_stride(bad)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TimeSeriesEncoder(TimeSeriesConfig(), lm_hidden=48).eval()


@pytest.mark.parametrize("length,rate", [(5, 1.0), (25, 50.0), (999, 1000.0), (4001, 100.0), (20_000, 1000.0),
                                         (20_001, 2.0)])
def test_token_count_matches_the_formula_for_any_length(encoder, length, rate):
    with torch.no_grad():
        out = encoder(torch.randn(length, 2), rate)
    assert out.shape == (ts_token_count(length, rate), 48)
    assert bool(torch.isfinite(out).all())


def test_token_count_is_lmdeploys():
    # patches n = ⌈(L − 2s)/s⌉ + 1, tokens (⌊n/2⌋ + 1) // 2: at 1 kHz s = 159
    assert ts_token_count(1_000_000, 1000.0) == (((math.ceil((1_000_000 - 318) / 159) + 1) // 2 + 1) // 2) == 1572
    assert ts_token_count(4, 1.0) == 0 and ts_token_count(5, 1.0) == 1  # s = 2: one token needs 5 samples


def test_the_tower_has_the_released_module_names():
    names = {n for n, _ in TimeSeriesEncoder(TimeSeriesConfig(), lm_hidden=48).state_dict().items()}
    for expected in ("encoder_embed.conv.weight", "encoder_embed.pos_encoder.pe",
                     "encoder_embed.transformer_encoder.layers.0.self_attn.in_proj_weight",
                     "encoder_embed.transformer_encoder.layers.0.linear1.weight", "encoder.adapt_in.weight",
                     "encoder.conv1.weight", "encoder.conv2.weight", "encoder.embed_positions.weight",
                     "encoder.layers.0.self_attn.q_proj.bias", "encoder.layers.0.self_attn.k_proj.weight",
                     "encoder.layers.0.self_attn_layer_norm.weight", "encoder.layers.0.fc1.weight",
                     "encoder.layers.0.final_layer_norm.weight", "encoder.layer_norm.weight", "encoder.adapt_out.weight",
                     "projector.layer_norm.weight", "projector.linear_1.weight", "projector.linear_2.weight"):
        assert expected in names, expected
    assert "encoder.layers.0.self_attn.k_proj.bias" not in names  # Whisper's k projection has no bias


def test_bad_signals_are_refused(encoder):
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder(torch.tensor([1.0, float("nan")] * 5), 1.0)
    with pytest.raises(ValueError, match="length, channels"):
        encoder(torch.zeros(0, 2), 1.0)
    with pytest.raises(ValueError, match="shorter than the 5 samples that make one token"):
        encoder(torch.zeros(4, 1), 1.0)


def test_a_million_points_encode_in_bounded_memory():
    """Peak resident memory above the starting point while encoding 10^6 and 4·10^6 points: per-patch encoding in
    chunks and the Whisper-style attention in query blocks, both bounded by model.timeseries.chunk_elements, so
    only the signal's own copies grow with it: measured 81 MiB at 10^6 and 177 MiB at 4·10^6 (whole attention
    over the 6.3k frames would add ~2.5 GiB, the per-patch encoder at once ~21 GiB)."""
    script = (
        "import json, sys, torch\n"
        "from scimoe.model.timeseries import TimeSeriesConfig, TimeSeriesEncoder\n"
        "from tests.peak_memory import peak_rss_during\n"
        "torch.manual_seed(0); torch.set_num_threads(2)\n"
        "enc = TimeSeriesEncoder(TimeSeriesConfig(), 128).eval()\n"
        "x = torch.randn(int(sys.argv[1]), 1)\n"
        "with torch.no_grad(): enc(torch.randn(2000, 1), 1000.0)\n"
        "with torch.no_grad(): out, extra = peak_rss_during(lambda: enc(x, 1000.0))\n"
        "print(json.dumps({'tokens': out.shape[0], 'extra_mib': extra / 2**20}))\n")
    runs = {}
    for n in (1_000_000, 4_000_000):
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, PYTHONPATH=REPO))
        assert out.returncode == 0, out.stderr[-2000:]
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs[1_000_000]["tokens"] == 1572
    assert runs[1_000_000]["extra_mib"] < 300, runs
    assert runs[4_000_000]["extra_mib"] < 2.5 * runs[1_000_000]["extra_mib"], runs  # far from 4× (or 16×)


def test_attention_in_query_blocks_equals_the_whole_causal_attention():
    from scimoe.model.timeseries import WhisperAttention

    torch.manual_seed(0)
    whole, blocked = WhisperAttention(32, 4, chunk_elements=1 << 30), WhisperAttention(32, 4, chunk_elements=4 * 50 * 7)
    blocked.load_state_dict(whole.state_dict())
    x = torch.randn(50, 32)
    with torch.no_grad():
        assert torch.allclose(whole(x), blocked(x), atol=1e-6)  # blocks of 7 queries
