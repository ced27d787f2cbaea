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
    return TimeSeriesEncoder(TimeSeriesConfig(window=64), lm_hidden=48).eval()


@pytest.mark.parametrize("length,rate", [(1, 1.0), (2, 5.0), (3, 1e-8), (7, 50.0), (999, 1000.0), (4001, 100.0),
                                         (20_000, 1000.0), (20_001, 2.0)])
def test_token_count_matches_the_formula_for_any_length(encoder, length, rate):
    with torch.no_grad():
        out = encoder(torch.randn(length, 2), rate)
    assert out.shape == (ts_token_count(length, rate, window=64), 48)
    assert bool(torch.isfinite(out).all())


def test_about_one_token_per_four_strides_at_high_rates():
    assert ts_token_count(1_000_000, 1000.0) == 1573  # ≈ 10^6 / (4 · 159): "10^6 points ≈ 1.6k tokens"


def test_multichannel_patch_vectors_are_the_mean_of_the_channels(encoder):
    x = torch.randn(500, 3)
    with torch.no_grad():
        joint = encoder.patch_vectors(x, 100.0)
        single = torch.stack([encoder.patch_vectors(x[:, c:c + 1], 100.0) for c in range(3)]).mean(0)
    assert torch.allclose(joint, single, atol=1e-5)
    # ... and the order of the channels does not matter for the whole encoder
    with torch.no_grad():
        assert torch.allclose(encoder(x, 100.0), encoder(x[:, [2, 0, 1]], 100.0), atol=1e-5)


def test_bad_signals_are_refused(encoder):
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder(torch.tensor([1.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match="length, channels"):
        encoder(torch.zeros(0, 2), 1.0)


def test_a_million_points_encode_in_bounded_memory():
    """Peak resident memory above the starting point while encoding 10^5 and 10^6 points (chunked): the
    10^6 run stays within 300 MiB (measured: 63 MiB at 10^5, 180 MiB at 10^6), and grows far less than 10×
    from 10^5 (the chunks bound it)."""
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
    for n in (100_000, 1_000_000):
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, PYTHONPATH=REPO))
        assert out.returncode == 0, out.stderr[-2000:]
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs[1_000_000]["tokens"] == 1573
    assert runs[1_000_000]["extra_mib"] < 300, runs
    assert runs[1_000_000]["extra_mib"] < 5 * runs[100_000]["extra_mib"] + 32, runs
