"""Verifiable, rule-based rewards: `fn(completion: str, answer: str) -> float`.

Tested by `python -m pytest tests/rl/test_rewards.py`. Built in: `exact_match` (the final answer, i.e.
the text after `</think>` if present, stripped, equals the reference), `math_equivalence` (the final answer
equals the reference as mathematics, by the maintained `math-verify` package), `think_format` (a `<think>…</think>`
block followed by a non-empty answer), `tool_call_json` (every `<tool_call>` block is a JSON object with
a string `name` and an object `arguments`, and there is at least one). `grpo.rewards` lists names or
allow-listed dotted paths (scimoe/registry.py) with weights; the reward is their weighted sum.
"""
from __future__ import annotations

import json
import logging
import numbers
import re
from typing import Callable

import torch

from scimoe.config import ConfigError
from scimoe.errors import RunError
from scimoe.registry import resolve_target

THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(\S.*)$", re.S)
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
log = logging.getLogger("scimoe")


END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


def final_answer(completion: str) -> str:
    """The answer of a trajectory: its last assistant turn (after any tool responses), after `</think>`, without
    the end-of-turn token."""
    text = completion.rsplit("<|im_start|>assistant\n", 1)[-1].split("</think>")[-1].strip()
    for end in END_OF_TURN:
        text = text.removesuffix(end)
    return text.strip()


def exact_match(completion: str, answer: str) -> float:
    return float(final_answer(completion) == answer.strip())


def think_format(completion: str, answer: str) -> float:
    return float(THINK.match(completion) is not None)


def math_equivalence(completion: str, answer: str) -> float:
    """1 when the final answer is mathematically equal to the reference (fractions, decimals, LaTeX, `\\boxed{}`,
    equivalent expressions), checked by HF's math-verify; 0 otherwise, also when either side does not parse
    (math-verify returns nothing for text it cannot parse; anything it raises is a verifier error, counted by
    Reward)."""
    from math_verify import parse, verify

    gold, guess = parse(answer), parse(final_answer(completion))
    return float(bool(gold) and bool(guess) and verify(gold, guess))


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
           "tool_call_json": "scimoe.rl.rewards.tool_call_json", "math_equivalence": "scimoe.rl.rewards.math_equivalence"}


class RewardError(ConfigError):
    """A reward function returned something that is not a number."""


class RewardFailure(RunError, RuntimeError):
    """A reward function raised (grpo.reward_errors=stop), or every reward of a step failed."""


class Reward:
    """The weighted sum of named reward functions; a value that is not a real number stops the run naming the
    function (a NaN or infinity passes through: GRPO leaves that group out and counts it). A function that raises
    is a verifier error: counted in `errors` (samples with at least one), logged with its traceback the first
    time, and scored 0 for that part (`on_error="zero"`) or stopping the run (`"stop"`)."""

    def __init__(self, parts: list[tuple[str, Callable[[str, str], float], float]], on_error: str = "zero") -> None:
        self.parts, self.on_error = parts, on_error
        self.errors = 0
        self._reported: set[str] = set()

    def _failed(self, name: str, completion: str, err: Exception) -> None:
        where = f"grpo.rewards.{name} raised {type(err).__name__}: {err} for the completion {completion[:120]!r}"
        if self.on_error == "stop":
            raise RewardFailure(f"{where} (grpo.reward_errors=stop)") from err
        if name not in self._reported:
            self._reported.add(name)
            log.warning("%s; scored 0 and counted in reward_errors (reported once per reward; "
                        "grpo.reward_errors=stop stops instead)", where, exc_info=err)

    def __call__(self, completion: str, answer: str) -> float:
        total, failed = 0.0, False
        for name, fn, weight in self.parts:
            try:
                value = fn(completion, answer)
            except Exception as err:  # noqa: BLE001 (a verifier's bug is counted per step, see _failed)
                self._failed(name, completion, err)
                failed, value = True, 0.0
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise RewardError(f"config error at 'grpo.rewards.{name}': it returned {type(value).__name__} "
                                  f"{str(value)[:80]!r}, not one number, for the completion {completion[:120]!r}")
            total += weight * float(value)
        self.errors += failed
        return total


def build_reward(spec: dict[str, float], on_error: str = "zero") -> Reward:
    """Weighted sum of the named (or allow-listed dotted-path) reward functions."""
    if not spec:
        raise ConfigError("config error at 'grpo.rewards': name at least one reward")
    return Reward([(name, resolve_target(name, f"grpo.rewards.{name}", REWARDS), float(weight))
                   for name, weight in spec.items()], on_error)
