"""FoPE against DESIGN.md's formulas, and its reduction to RoPE: `python -m pytest tests/model/test_rotary.py`."""
from __future__ import annotations

import math

import torch

from scimoe.model.rotary import FoPE, RoPE, apply_rotary, kept_frequency_count


def _direct_fope(fope: FoPE, k: torch.Tensor, positions: list[int], head_dim: int, theta: float) -> torch.Tensor:
    """k′ = k⊙cos′ + rotate_half(k)⊙sin′ written out element by element for x [T, H, d]."""
    half = head_dim // 2
    kept = fope.kept
    out = torch.empty_like(k)
    for t, m in enumerate(positions):
        for h in range(k.shape[1]):
            cos_half, sin_half = [], []
            for j in range(half):
                if j < kept:
                    w = [float(fope.inv_freq[i]) for i in range(kept)]
                    c = sum(math.cos(w[i] * m) * fope.cos_coef[h, i, j].item() for i in range(kept))
                    s = sum(math.sin(w[i] * m) * fope.sin_coef[h, i, j].item() for i in range(kept))
                else:  # clipped: both constant 1, as the released code pads them
                    c, s = 1.0, 1.0
                cos_half.append(c)
                sin_half.append(s)
            cos, sin = cos_half * 2, sin_half * 2
            x = k[t, h].tolist()
            rot = [-v for v in x[half:]] + x[:half]
            out[t, h] = torch.tensor([x[i] * cos[i] + rot[i] * sin[i] for i in range(head_dim)])
    return out


def test_fope_matches_the_direct_formula_with_clipped_frequencies():
    head_dim, theta, lmax = 16, 5e6, 4096
    fope = FoPE(head_dim, theta, lmax, n_kv_heads=2)
    assert fope.kept == kept_frequency_count(head_dim, theta, lmax) == 4  # 4 of 8 clipped
    positions = [0, 1, 5, 77, 4000]
    k = torch.randn(1, len(positions), 2, head_dim)
    cos, sin = fope(torch.tensor([positions]))
    got = apply_rotary(k, cos, sin)[0]
    assert torch.allclose(got, _direct_fope(fope, k[0], positions, head_dim, theta), atol=1e-4)


def test_fope_tables_are_buffers_initialised_as_released_unless_trained():
    fope = FoPE(128, 5e6, 262144, n_kv_heads=4, init_factor=0.5)
    assert fope.kept == 45 and not list(fope.parameters()) and {"cos_coef", "sin_coef"} <= set(fope.state_dict())
    noise = fope.cos_coef - torch.eye(45)
    # xavier_normal_ of the [4, 45, 45] tensor: gain·sqrt(2 / (45·45 + 4·45)) = 0.5 · 0.0301 = 0.0151
    assert abs(float(noise.std()) - 0.0151) < 0.0008
    trained = FoPE(128, 5e6, 262144, n_kv_heads=4, trainable=True)
    assert sorted(n for n, _ in trained.named_parameters()) == ["cos_coef", "sin_coef"]
    inv = 1.0 / (5e6 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))  # the released formula
    assert torch.equal(fope.inv_freq, inv[:45]) and bool((inv[:45] > 2 * math.pi / 262144).all())


def test_query_heads_use_their_kv_heads_table():
    fope = FoPE(16, 5e6, 4096, n_kv_heads=2)
    cos, sin = fope(torch.arange(6).view(1, 6))
    q = torch.randn(1, 6, 4, 16)  # 4 query heads over 2 KV heads: heads 0,1 → table 0; 2,3 → table 1
    got = apply_rotary(q, cos, sin)
    for h in range(4):
        single = apply_rotary(q[:, :, h:h + 1], cos[:, :, h // 2:h // 2 + 1], sin[:, :, h // 2:h // 2 + 1])
        assert torch.allclose(got[:, :, h:h + 1], single)


def test_fope_with_identity_mixing_and_no_clipping_is_rope():
    head_dim, theta = 16, 10000.0
    lmax = 10 ** 12  # every frequency completes a period: nothing clipped
    fope = FoPE(head_dim, theta, lmax, n_kv_heads=2)
    assert fope.kept == head_dim // 2
    with torch.no_grad():
        fope.cos_coef.copy_(torch.eye(8).expand(2, 8, 8))
        fope.sin_coef.copy_(torch.eye(8).expand(2, 8, 8))
    positions = torch.arange(40).view(1, 40)
    x = torch.randn(1, 40, 4, head_dim)
    assert torch.allclose(apply_rotary(x, *fope(positions)), apply_rotary(x, *RoPE(head_dim, theta)(positions)), atol=1e-6)


def test_rope_is_relative():
    rope = RoPE(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = apply_rotary(q, *rope(torch.tensor([[m]])))
        kn = apply_rotary(k, *rope(torch.tensor([[n]])))
        return (qm * kn).sum()

    assert torch.allclose(score(7, 3), score(104, 100), atol=1e-5)
