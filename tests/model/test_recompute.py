"""Activation recomputation: bitwise the same gradients and state, far fewer saved activations, bad settings
refused by key. Run: `python -m pytest tests/model/test_recompute.py` (4-rank layouts:
tests/distributed/test_recompute_parity.py)."""
from __future__ import annotations

import pytest
import torch

from scimoe.config import ConfigError, ModelConfig, MoEConfig, compose_config
from scimoe.model import build_model

@pytest.fixture(autouse=True)
def deterministic():
    """As training runs (train.deterministic): the embedding's CPU backward otherwise sums in any order."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


CFG = ModelConfig(zero_init_output=False, moe=MoEConfig(router_mode="ste_ema", z_loss_coef=1e-3, bias_update_rate=1e-3))


def _step(mode: str, positions: torch.Tensor, layers=None):
    """Gradients, routed-load and STE-EMA sums after one forward/backward, and the bytes autograd saved outside
    recomputed blocks."""
    torch.manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, positions.shape)
    model = build_model(CFG, seed=1).train()
    model.set_recompute(mode, layers)
    saved: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, positions, labels=ids)
    (out.loss_sum / out.label_tokens + out.balance_loss + out.z_loss).backward()
    moes = model.moe_layers()
    return ({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            [m.load_since_update.clone() for m in moes], [m.output_sum_since_update.clone() for m in moes],
            sum(saved.values()))


@pytest.mark.parametrize("packed", [False, True], ids=["whole_rows", "packed_documents"])
def test_recomputed_gradients_and_router_state_are_bitwise_the_same(packed):
    positions = torch.cat([torch.arange(40), torch.arange(88)]) if packed else torch.arange(128)
    positions = positions.expand(2, 128)
    grads, loads, sums, saved = _step("none", positions)
    assert sum(l.sum() for l in loads) > 0
    sizes = {}
    for mode in ("selective", "full"):
        g, l, s, sizes[mode] = _step(mode, positions)
        assert g.keys() == grads.keys()
        for name in grads:
            assert torch.equal(g[name], grads[name]), (mode, name)
        # the forward's bookkeeping happens once, not again when the block is recomputed
        assert all(torch.equal(a, b) for a, b in zip(l, loads)) and all(torch.equal(a, b) for a, b in zip(s, sums))
    assert sizes["full"] < 0.2 * saved and sizes["selective"] < 0.8 * saved, (saved, sizes)


def test_recompute_of_some_layers_only():
    positions = torch.arange(64).expand(2, 64)
    grads, _, _, saved = _step("none", positions)
    g, _, _, some = _step("full", positions, layers=[1, 2])
    assert all(torch.equal(g[n], grads[n]) for n in grads)
    assert _step("full", positions)[3] < some < saved


def test_bad_recompute_settings_are_refused_by_key():
    with pytest.raises(ConfigError, match="train.recompute.*none, selective or full"):
        compose_config(["train.recompute=layers"])
    with pytest.raises(ConfigError, match=r"train.recompute_layers.*\[4\] that do not exist \(model.layers = 4"):
        compose_config(["train.recompute=full", "train.recompute_layers=[0,4]"])
    with pytest.raises(ConfigError, match="train.recompute_layers.*train.recompute is none"):
        compose_config(["train.recompute_layers=[0]"])
