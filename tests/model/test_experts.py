"""Grouped experts and the MoE layer against a per-token reference: `python -m pytest tests/model/test_experts.py`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scimoe.model.moe.experts import grouped_linear
from scimoe.model.moe.layer import MoELayer
from tests.conftest import small_moe


@pytest.mark.parametrize("width", [16, 6])  # 16: torch grouped_mm path; 6: unaligned fallback
def test_grouped_linear_equals_a_loop_including_empty_experts(width):
    counts = torch.tensor([3, 0, 5, 0, 2])
    x = torch.randn(int(counts.sum()), width, requires_grad=True)
    w = torch.randn(5, 8, width, requires_grad=True)
    y = grouped_linear(x, w, counts)
    ref_rows = torch.split(x, counts.tolist())
    ref = torch.cat([r @ w[e].t() for e, r in enumerate(ref_rows)])
    assert torch.allclose(y, ref, atol=1e-5)
    y.sum().backward()  # an expanded gradient must be accepted
    got_w, got_x = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    ref.sum().backward()
    assert torch.allclose(got_w, w.grad, atol=1e-5) and torch.allclose(got_x, x.grad, atol=1e-5)
    assert got_w[1].abs().sum() == 0 and got_w[0].abs().sum() > 0


def test_moe_layer_equals_per_token_reference():
    torch.manual_seed(0)
    layer = MoELayer(16, small_moe(num_experts=8, top_k=4, n_groups=2, shared_expert_ffn=8))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    y, aux = layer(x)
    flat = x.view(-1, 16)
    r = layer.router(flat)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot, e in enumerate(r.indices[t].tolist()):
            gate, up = (layer.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            expected[t] += r.weights[t, slot] * (layer.experts.down_proj[e] @ (F.silu(gate) * up))
    expected += layer.shared_expert(flat)
    assert torch.allclose(y.view(-1, 16), expected, atol=1e-5)
    assert torch.equal(aux.counts, torch.bincount(r.indices.flatten(), minlength=8))


def test_bf16_autocast_runs_experts_in_bf16_and_stays_close_to_fp32():
    layer = MoELayer(16, small_moe())
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 16)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, aux = layer(x)
    assert y16.dtype == torch.float32  # returned in the residual stream's dtype
    assert torch.allclose(y16, y32, atol=0.1, rtol=0.05)
    assert not torch.equal(y16, y32)
