"""Multi-turn tool rollouts: `python -m pytest tests/rl/test_tools.py`."""
from __future__ import annotations

import json
import random
import time

import pytest
import torch

from scimoe.config import compose_config
from scimoe.model import build_model
from scimoe.rl.generate import Policy
from scimoe.rl.grpo import grpo
from scimoe.rl.rewards import RewardError, build_reward, final_answer
from scimoe.rl.scoring import logprob_head, rollout_batch
from scimoe.rl.tasks import LOOKUP_CALL, LookupTask
from scimoe.rl.tools import Tools, build_tools, calculator, sample_with_tools
from scimoe.checkpoint import contents, shards, storage
from scimoe.train.step import forward_with_head


def slow(x: int) -> str:
    while True:
        x += 1


def test_every_bad_call_and_bad_tool_becomes_an_error_response_not_a_crash():
    tools = Tools({"calc": calculator, "boom": lambda: 1 / 0, "slow": slow, "obj": lambda: object(),
                   "table": lambda: {"a": 1}}, timeout_s=0.2)
    assert tools.run('{"name": "calc", "arguments": {"expression": "37*48"}}').text == "1776"
    assert tools.run('{"name": "table", "arguments": {}}').text == '{"a": 1}'  # JSON is text
    cases = {'{"name": "calc", "arguments": {"expression": "37*48"': "not JSON",
             '{"arguments": {}}': '"name": str', '{"name": "rm", "arguments": {}}': "no tool named 'rm'",
             '{"name": "boom", "arguments": {}}': "ZeroDivisionError",
             '{"name": "calc", "arguments": {"expression": "__import__(1)"}}': "not an arithmetic expression",
             '{"name": "calc", "arguments": {"nope": 1}}': "TypeError",
             '{"name": "obj", "arguments": {}}': "returned object, not text"}
    for call, why in cases.items():
        outcome = tools.run(call)
        assert outcome.text.startswith("error: ") and why in outcome.text, (call, outcome)
    began = time.perf_counter()
    outcome = tools.run('{"name": "slow", "arguments": {"x": 1}}')
    assert "took longer than 0.2 s" in outcome.text and time.perf_counter() - began < 2
    assert [tools.run(c).well_formed for c in ('{"x": 1}', '{"name": "boom", "arguments": {}}')] == [False, True]


def _warm_policy(steps: int, seed: int = 0):
    """A tiny policy taught the lookup format on imperfect demonstrations (half the calls malformed, the
    prompt's key asked for in 15%): what RL starts from."""
    cfg = compose_config(["recipe=grpo_tools"])
    task = LookupTask()
    model = build_model(cfg.model, seed=cfg.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        demos = task.demonstrations(32, rng, well_formed=0.5, right_key=0.15)
        width = max(len(t) for t, _ in demos)
        ids = torch.tensor([t + [0] * (width - len(t)) for t, _ in demos])
        labels = torch.tensor([[t[i + 1] if i + 1 < len(t) and m[i + 1] else -100 for i in range(width)]
                               for t, m in demos])
        out = model(ids, torch.arange(width).expand_as(ids), labels)
        optimizer.zero_grad()
        (out.loss_sum / out.label_tokens).backward()
        optimizer.step()
    return cfg, task, model


def test_a_tool_trajectory_masks_responses_and_its_cache_scores_like_a_full_forward():
    cfg, task, model = _warm_policy(60)
    tools = build_tools(cfg.grpo, task)
    ids, answer = task.batch(0, 1, 7)[0]
    rollout = sample_with_tools(Policy(model), ids, cfg.grpo, task.tokenizer, tools, torch.Generator().manual_seed(3))
    text = task.tokenizer.decode(rollout.tokens[0, rollout.prompt_len:].tolist())
    assert "<tool_response>" in text, text
    response = task.tokenizer.encode("<tool_response>")[0]
    completion = rollout.tokens[0, rollout.prompt_len:]
    at = int((completion == response).nonzero()[0])
    assert not bool(rollout.completion_mask[0, at])  # the model did not write the response: not trained
    assert bool(rollout.completion_mask[0, 0])  # it wrote the call
    assert rollout.experts[0].shape[1] == rollout.tokens.shape[1] - 1  # every fed token's experts, tools included
    # The KV cache grew by whole tool responses; a plain forward over the trajectory gives the same log-probs.
    with torch.no_grad():
        extras, _ = forward_with_head(model, [], rollout_batch([rollout], True), logprob_head(model.comm, 0.8),
                                      backward=False)
    sampled = rollout.completion_mask
    assert torch.allclose(extras["logp"][sampled], rollout.logprobs[sampled], atol=1e-5)


@pytest.mark.slow
def test_grpo_with_tools_raises_the_reward_and_the_share_of_well_formed_calls(tmp_path):
    """50 steps of 8 prompts × 8 samples from the warm start, ~50 s. Measured over train.seed 1234, 1, 2, 3, 4:
    mean reward of the last 10 steps minus the first 10 steps is 0.25-0.43 (well-formed calls 0.80-0.83 → 1.0).
    With 4 prompts per step the rise depended on the seed and on the CPU's kernels (+0.07 to +0.35 over 50
    steps, one seed +0.08 after 80): too noisy for a test of whether GRPO learns. The test asks for +0.1: a mean
    over 10 steps of 64 samples moves by ~0.02 (one standard error) without learning, and the slowest of the
    five seeds rose 2.5 times that much."""
    cfg, _, model = _warm_policy(150)
    state = contents.tensor_state(model)
    from omegaconf import OmegaConf

    start = contents.write(str(tmp_path / "warm"), 0, {n: (n, t, shards.placement(t, None)) for n, t in state.items()},
                             None, None, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    run = compose_config(["recipe=grpo_tools", "train.steps=50", "grpo.prompts_per_step=8", "logger=jsonl",
                          f"checkpoint.init_weights={start}"])
    records = grpo(run, str(tmp_path / "run"))
    first, last = records[:10], records[-10:]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "reward_mean") > mean(first, "reward_mean") + 0.1, (mean(first, "reward_mean"), mean(last, "reward_mean"))
    assert mean(first, "well_formed_tool_calls") < 0.95 <= mean(last, "well_formed_tool_calls")
    assert all(r["tool_calls_per_sample"] > 0.5 for r in records[-10:])


def test_the_answer_is_read_from_the_last_assistant_turn():
    trajectory = (f"<tool_call>{LOOKUP_CALL}3}}}}</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n47\n"
                  "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>copy it</think>47<|im_end|>")
    assert final_answer(trajectory) == "47"
    assert build_reward({"exact_match": 1.0, "tool_call_json": 0.5})(trajectory, "47") == 1.5


def test_a_reward_that_is_not_a_number_stops_naming_it_and_a_nan_group_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setenv("SCIMOE_ALLOWED_TARGETS", "tests.rl")
    with pytest.raises(RewardError, match=r"grpo\.rewards\.tests\.rl\.test_tools\.a_list.*returned list"):
        build_reward({"tests.rl.test_tools.a_list": 1.0})("7", "7")
    cfg = compose_config(["recipe=grpo", "train.steps=2", "logger=jsonl"])
    cfg.grpo.rewards = {"exact_match": 1.0, "tests.rl.test_tools.nan_for_three": 1.0}
    records = grpo(cfg, str(tmp_path))
    assert all(r["skipped"] == 0 for r in records)  # the update stays finite
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_groups"] for r in logged) > 0  # groups whose answer is 3 were left out, and counted


def a_list(completion: str, answer: str):
    return [1.0]


def nan_for_three(completion: str, answer: str) -> float:
    return float("nan") if answer == "3" else 0.0
