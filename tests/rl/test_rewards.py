"""Rule-based rewards: `python -m pytest tests/rl/test_rewards.py`."""
from __future__ import annotations

import pytest

from scimoe.rl.rewards import build_reward, exact_match, think_format, tool_call_json


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
