"""Verifiable, rule-based rewards: `fn(completion: str, answer: str) -> float`.

Tested by `python -m pytest tests/rl/test_rewards.py`. Built in: `exact_match` (the final answer, i.e.
the text after `</think>` if present, stripped, equals the reference), `think_format` (a `<think>…</think>`
block followed by a non-empty answer), `tool_call_json` (every `<tool_call>` block is a JSON object with
a string `name` and an object `arguments`, and there is at least one). `grpo.rewards` lists names or
allow-listed dotted paths (scimoe/registry.py) with weights; the reward is their weighted sum.
"""
from __future__ import annotations

import json
import re
from typing import Callable

from scimoe.registry import resolve_target

THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(\S.*)$", re.S)
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def final_answer(completion: str) -> str:
    return completion.split("</think>")[-1].strip()


def exact_match(completion: str, answer: str) -> float:
    return float(final_answer(completion) == answer.strip())


def think_format(completion: str, answer: str) -> float:
    return float(THINK.match(completion) is not None)


def tool_call_json(completion: str, answer: str) -> float:
    calls = TOOL_CALL.findall(completion)
    if not calls:
        return 0.0
    for body in calls:
        try:
            call = json.loads(body)
        except ValueError:
            return 0.0
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
            return 0.0
    return 1.0


REWARDS = {"exact_match": "scimoe.rl.rewards.exact_match", "think_format": "scimoe.rl.rewards.think_format",
           "tool_call_json": "scimoe.rl.rewards.tool_call_json"}


def build_reward(spec: dict[str, float]) -> Callable[[str, str], float]:
    """Weighted sum of the named (or allow-listed dotted-path) reward functions."""
    if not spec:
        raise ValueError("config error at 'grpo.rewards': name at least one reward")
    parts = [(resolve_target(name, f"grpo.rewards.{name}", REWARDS), float(weight)) for name, weight in spec.items()]
    return lambda completion, answer: sum(w * fn(completion, answer) for fn, w in parts)
