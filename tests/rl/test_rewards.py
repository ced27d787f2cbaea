"""Rule-based rewards: `python -m pytest tests/rl/test_rewards.py`."""
from __future__ import annotations

import os

import pytest

from scimoe.rl.rewards import RewardFailure, build_reward, exact_match, think_format, tool_call_json


def test_exact_match_reads_the_answer_after_the_think_block():
    assert exact_match("<think>\n3 and 4\n</think>\n\n7", "7") == 1.0
    assert exact_match(" 7 ", "7") == 1.0 and exact_match("<think>7</think> 8", "7") == 0.0


def test_think_format_needs_a_think_block_and_an_answer():
    assert think_format("<think>\nwork\n</think>\n\n7", "") == 1.0
    assert think_format("<think>work</think>", "") == 0.0 and think_format("7", "") == 0.0


def test_tool_call_json_validity():
    good = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert tool_call_json(good, "") == 1.0
    assert tool_call_json(good + '<tool_call>{"name": "add"}</tool_call>', "") == 0.0  # no arguments
    assert tool_call_json("<tool_call>{not json}</tool_call>", "") == 0.0 and tool_call_json("7", "") == 0.0


def test_weighted_rewards_and_user_functions_through_the_allow_list(monkeypatch):
    reward = build_reward({"exact_match": 1.0, "think_format": 0.5})
    assert reward("<think>x</think> 7", "7") == 1.5
    monkeypatch.setenv("SCIMOE_ALLOWED_TARGETS", "tests.rl")
    assert build_reward({"tests.rl.test_rewards.always_one": 2.0})("anything", "") == 2.0
    monkeypatch.delenv("SCIMOE_ALLOWED_TARGETS")
    with pytest.raises(ValueError, match="grpo.rewards.os.system"):
        build_reward({"os.system": 1.0})


def always_one(completion: str, answer: str) -> float:
    return 1.0


_calls = {"n": 0}


def fails_every_fourth_call(completion: str, answer: str) -> float:
    _calls["n"] += 1
    if _calls["n"] % 4 == 0:
        raise ZeroDivisionError("a verifier bug")
    return 1.0


def always_fails(completion: str, answer: str) -> float:
    raise KeyError("a verifier bug")


def test_a_raising_reward_is_counted_not_silently_zero(monkeypatch, caplog):
    monkeypatch.setenv("SCIMOE_ALLOWED_TARGETS", "tests.rl")
    _calls["n"] = 0
    reward = build_reward({"tests.rl.test_rewards.fails_every_fourth_call": 1.0, "exact_match": 1.0})
    with caplog.at_level("WARNING", logger="scimoe"):
        scores = [reward("7", "7") for _ in range(8)]
    assert scores == [2.0, 2.0, 2.0, 1.0] * 2 and reward.errors == 2
    assert len(caplog.records) == 1 and "raised ZeroDivisionError: a verifier bug" in caplog.text  # reported once
    _calls["n"] = 3
    stopping = build_reward({"tests.rl.test_rewards.fails_every_fourth_call": 1.0}, on_error="stop")
    with pytest.raises(RewardFailure, match=r"grpo.rewards.tests.rl.test_rewards.fails_every_fourth_call raised "
                                            r"ZeroDivisionError.*grpo.reward_errors=stop"):
        stopping("7", "7")


def test_grpo_logs_reward_errors_per_step_and_stops_when_every_reward_failed(tmp_path, monkeypatch):
    from scimoe.config import compose_config
    from scimoe.rl.grpo import grpo

    monkeypatch.setenv("SCIMOE_ALLOWED_TARGETS", "tests.rl")
    _calls["n"] = 0
    cfg = compose_config(["recipe=grpo", "train.steps=2", "logger=jsonl"])
    cfg.grpo.rewards = {"tests.rl.test_rewards.fails_every_fourth_call": 1.0}
    records = grpo(cfg, str(tmp_path / "some"))
    assert [r["reward_errors"] for r in records] == [16, 16]  # 64 completions a step, every fourth raised
    cfg.grpo.rewards = {"tests.rl.test_rewards.always_fails": 1.0}
    with pytest.raises(RewardFailure, match="step 1: the reward function raised for every one of the 64"):
        grpo(cfg, str(tmp_path / "all"))
    assert not os.path.exists(tmp_path / "all" / "checkpoints")  # nothing was trained on it
