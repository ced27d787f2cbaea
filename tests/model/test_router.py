"""Grouped routing and the three router gradient modes: `python -m pytest tests/model/test_router.py`."""
from __future__ import annotations

import pytest
import torch

from scimoe.model.moe.layer import MoELayer
from scimoe.model.moe.router import GroupedRouter, grouped_topk
from tests.conftest import small_moe


def test_grouped_topk_takes_top_k_over_g_inside_every_group():
    scores = torch.rand(100, 16)
    idx = grouped_topk(scores, top_k=8, n_groups=4)
    assert idx.shape == (100, 8)
    groups = idx // 4
    for g in range(4):
        assert torch.equal((groups == g).sum(-1), torch.full((100,), 2))
        best = scores[:, g * 4:(g + 1) * 4].topk(2, dim=-1).indices + g * 4
        assert torch.equal(idx[:, 2 * g:2 * g + 2], best)


def test_one_group_is_plain_top_k():
    scores = torch.rand(50, 12)
    assert torch.equal(grouped_topk(scores, 3, 1), scores.topk(3, dim=-1).indices)


@pytest.mark.parametrize("mode", ["sparse", "ste", "ste_ema"])
def test_weights_sum_to_one_and_follow_probabilities(mode):
    router = GroupedRouter(8, 16, 4, 2, mode)
    torch.nn.init.normal_(router.weight)
    r = router(torch.randn(30, 8))
    assert torch.allclose(r.weights.sum(-1), torch.ones(30), atol=1e-6)
    sel = r.probs.gather(1, r.indices)
    assert torch.allclose(r.weights, sel / sel.sum(-1, keepdim=True))


def _layers(**kw):
    torch.manual_seed(1)
    base = MoELayer(16, small_moe(router_mode="sparse", **kw))
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.3)
    base.expert_output_ema.normal_()
    out = {}
    for mode in ("sparse", "ste", "ste_ema"):
        out[mode] = MoELayer(16, small_moe(router_mode=mode, **kw))
        out[mode].load_state_dict(base.state_dict())
    return out


def test_router_modes_give_bit_identical_forward_outputs():
    x = torch.randn(2, 5, 16)
    outputs = {mode: layer(x)[0] for mode, layer in _layers().items()}
    assert torch.equal(outputs["sparse"], outputs["ste"])
    assert torch.equal(outputs["sparse"], outputs["ste_ema"])


def test_only_dense_modes_reach_non_selected_router_rows():
    x = torch.randn(1, 1, 16)  # one token: 4 of 8 experts selected
    for mode, layer in _layers().items():
        y, aux = layer(x)
        y.pow(2).sum().backward()
        grad = layer.router.weight.grad
        chosen = torch.zeros(8, dtype=torch.bool)
        chosen[aux.indices.flatten()] = True
        rows = grad[~chosen].abs().sum(-1)
        if mode == "sparse":
            assert torch.equal(rows, torch.zeros_like(rows)), mode
        else:
            assert (rows > 0).all(), mode


def test_ste_ema_router_gradient_equals_the_hand_formula():
    layer = _layers()["ste_ema"]
    x = torch.randn(1, 1, 16)
    y, aux = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    with torch.no_grad():
        flat, g = x.view(1, 16), g.view(16)
        z = flat @ layer.router.weight.t()
        p = z.softmax(-1).view(8)
        sel = aux.indices.view(-1)
        # ∂L/∂p_j: ⟨g, E_j(x)⟩ for selected experts (STE), ⟨g, Ê_j⟩ for the others (EMA path).
        dp = layer.expert_output_ema @ g
        for e in sel.tolist():
            gu = layer.experts.gate_up_proj[e] @ flat.view(16)
            gate, up = gu.chunk(2)
            out = layer.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
            dp[e] = out @ g
        dz = p * (dp - (p * dp).sum())
        expected = dz.view(8, 1) * flat.view(1, 16)
    assert torch.allclose(layer.router.weight.grad, expected, atol=1e-5, rtol=1e-4)
