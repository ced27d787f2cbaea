"""Sampling with a KV cache and router replay: `python -m pytest tests/rl/test_generate.py`."""
from __future__ import annotations

import pytest
import torch

from scimoe.config import ModelConfig, MoEConfig
from scimoe.model import build_model
from scimoe.rl.generate import filter_logits, sample
from scimoe.rl.scoring import logprob_head, rollout_batch
from scimoe.train.step import forward_with_head


def token_logprobs(model, rollouts, temperature, replay):
    """The sampled tokens' log-probs under `model` and its MoE aux outputs (as GRPO scores them)."""
    with torch.no_grad():
        extras, auxes = forward_with_head(model, [], rollout_batch(rollouts, replay), logprob_head(model.comm, temperature),
                                          backward=False)
    return extras["logp"], auxes


def _model(pos_emb: str = "fope"):
    cfg = ModelConfig(vocab_size=32, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, pos_emb=pos_emb,
                      zero_init_output=False, moe=MoEConfig(num_experts=8, top_k=2, n_groups=2, ffn_hidden=32))
    return build_model(cfg, seed=3)


@pytest.mark.parametrize("pos_emb", ["fope", "rope"])
def test_the_kv_cache_samples_what_full_recomputation_samples(pos_emb):
    model = _model(pos_emb)
    runs = [sample(model, [1, 2, 3, 4], n=4, max_new=12, eos_id=31, temperature=1.0, top_k=0, top_p=1.0,
                   generator=torch.Generator().manual_seed(5), use_cache=cache) for cache in (True, False)]
    cached, full = runs
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.allclose(cached.logprobs, full.logprobs, atol=1e-5)
    for a, b in zip(cached.experts, full.experts):  # the experts every input token went to, both ways
        assert torch.equal(a, b) and a.shape == (4, cached.tokens.shape[1] - 1, 2)


def test_sampling_stops_at_eos_and_masks_what_follows():
    model, eos, calls = _model(), 7, {"n": 0}

    def steer(module, inputs, out):  # sequence r writes token 5 r+1 times, then EOS
        step, out = calls["n"], torch.zeros_like(out)
        calls["n"] += 1
        for row in range(out.shape[0]):
            out[row, -1, eos if step >= row + 1 else 5] = 100.0
        return out

    model.lm_head.register_forward_hook(steer)
    rollout = sample(model, [1, 2], n=3, max_new=6, eos_id=eos, generator=torch.Generator().manual_seed(0))
    assert rollout.tokens.shape[1] == 2 + 4  # stopped once every sequence had its EOS
    assert rollout.completion_mask.sum(1).tolist() == [2, 3, 4]  # up to and including the first EOS
    assert rollout.tokens[0, 2:].tolist() == [5, eos, eos, eos]  # a finished sequence only pads with EOS


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 crosses it → keep two
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]


def test_router_replay_forces_the_recorded_experts_and_reports_the_mismatch():
    model = _model()
    rollout = sample(model, [1, 2, 3], n=4, max_new=8, eos_id=31, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the policy moves after sampling, as it does between rollout and update
        for moe in model.moe_layers():
            moe.router.weight.add_(torch.randn_like(moe.router.weight) * 0.5)
    _, replayed = token_logprobs(model, [rollout], temperature=0.8, replay=True)
    _, free = token_logprobs(model, [rollout], temperature=0.8, replay=False)
    for aux, recorded in zip(replayed, rollout.experts):
        assert torch.equal(aux.indices, recorded.reshape(-1, 2))  # exactly the rollout's experts
        assert 0 < aux.replay_mismatch <= 1  # and the router alone would have chosen others this often
    changed = [float((a.indices.sort(-1).values != r.reshape(-1, 2).sort(-1).values).any(-1).float().mean())
               for a, r in zip(free, rollout.experts)]
    assert changed == pytest.approx([a.replay_mismatch for a in replayed])


def test_scoring_gives_the_log_probs_the_sampler_saw():
    model = _model()
    rollout = sample(model, [1, 2, 3], n=4, max_new=6, eos_id=31, temperature=0.7, top_k=0, top_p=1.0,
                     generator=torch.Generator().manual_seed(2))
    logp, _ = token_logprobs(model, [rollout], temperature=0.7, replay=True)
    assert torch.allclose(logp[rollout.completion_mask], rollout.logprobs[rollout.completion_mask], atol=1e-5)
