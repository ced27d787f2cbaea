"""Multi-turn tool rollouts: the model writes `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, the named
tool (an allow-listed Python function) runs, its answer comes back as a `<tool_response>` turn in the chat
format, and the model goes on, up to `grpo.max_turns` calls per trajectory.

Tested by `python -m pytest tests/rl/test_tools.py`. A malformed call (not JSON, no name, unknown tool), a tool
that raises, runs past `grpo.tool_timeout_s` or returns something that is not text or JSON becomes an
`error: …` tool response, never a crash; the trajectory goes on. Tool responses are fed to the model but masked
out of the loss (the model did not write them); rewards read the whole trajectory. Each sample of a group is
decoded on its own (its own KV cache: after a tool call the sequences of a group no longer line up);
expert-parallel ranks stay in lockstep sample by sample. The timeout interrupts a tool at its next Python
bytecode (SIGALRM): a tool blocked inside C code is interrupted when it returns to Python.
"""
from __future__ import annotations

import json
import re
import signal
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from scimoe.registry import resolve_target
from scimoe.rl.generate import Policy, Rollout, filter_logits

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
CALL_END = "</tool_call>"
RESPONSE = "<|im_end|>\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
"""What follows a tool call in Intern-S1-Pro's chat format, up to the model's next turn."""

BUILTIN_TOOLS = {"calculator": "scimoe.rl.tools.calculator"}


class ToolTimeout(Exception):
    pass


@dataclass
class ToolOutcome:
    text: str
    """What goes inside <tool_response> (the tool's answer, or `error: …`)."""
    well_formed: bool
    """The call parsed as JSON with a name and arguments object, naming an allowed tool."""


def calculator(expression: str) -> str:
    """Arithmetic on numbers with + − × / ( ): a built-in tool for toy tasks (no names, no calls: safe to eval)."""
    if not re.fullmatch(r"[0-9.+\-*/() ]{1,200}", expression):
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    return str(eval(expression, {"__builtins__": {}}, {}))  # noqa: S307 (the pattern above admits arithmetic only)


class Tools:
    """The allow-listed functions a rollout may call, and how a call becomes a response."""

    def __init__(self, functions: dict[str, Callable], timeout_s: float) -> None:
        self.functions, self.timeout_s = functions, timeout_s

    def run(self, call: str) -> ToolOutcome:
        try:
            request = json.loads(call)
        except ValueError as err:
            return ToolOutcome(f"error: the tool call is not JSON ({err})", False)
        if not isinstance(request, dict) or not isinstance(request.get("name"), str) or \
                not isinstance(request.get("arguments", {}), dict):
            return ToolOutcome('error: a tool call is {"name": str, "arguments": object}', False)
        function = self.functions.get(request["name"])
        if function is None:
            return ToolOutcome(f"error: no tool named {request['name']!r} (tools: {', '.join(self.functions)})", False)
        try:
            result = self._with_timeout(function, request.get("arguments", {}))
        except ToolTimeout:
            return ToolOutcome(f"error: {request['name']} took longer than {self.timeout_s} s", True)
        except Exception as err:  # noqa: BLE001 (whatever a tool raises is the model's problem, not the run's)
            return ToolOutcome(f"error: {request['name']} failed: {type(err).__name__}: {err}", True)
        if isinstance(result, str):
            return ToolOutcome(result, True)
        try:
            return ToolOutcome(json.dumps(result), True)
        except (TypeError, ValueError):
            return ToolOutcome(f"error: {request['name']} returned {type(result).__name__}, not text", True)

    def _with_timeout(self, function: Callable, arguments: dict):
        if threading.current_thread() is not threading.main_thread() or not self.timeout_s:
            return function(**arguments)

        def expire(signum, frame):
            raise ToolTimeout()

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        try:
            return function(**arguments)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def build_tools(grpo, task) -> Tools | None:
    """The run's tools: the task's own (e.g. the lookup toy's) and `grpo.tools` (name → built-in or allow-listed
    dotted path); None for single-turn runs (`grpo.max_turns` 0)."""
    if not grpo.max_turns:
        return None
    functions = dict(getattr(task, "tools", {}))
    for name, target in grpo.tools.items():
        functions[name] = resolve_target(target, f"grpo.tools.{name}", BUILTIN_TOOLS)
    if not functions:
        from scimoe.config import ConfigError

        raise ConfigError("config error at 'grpo.tools': grpo.max_turns > 0 needs at least one tool")
    return Tools(functions, grpo.tool_timeout_s)


@torch.no_grad()
def sample_with_tools(policy: Policy, prompt: list[int], grpo, tokenizer, tools: Tools, generator: torch.Generator,
                      everyone_done: Callable[[bool], bool] | None = None, stats=None) -> Rollout:
    """`grpo.group_size` multi-turn trajectories of one prompt (see the module docstring), padded into one
    Rollout; `stats` (GRPO's StepStats) counts the tool calls and the well-formed ones."""
    end_ids = tokenizer.encode(CALL_END)
    samples = []
    with policy.decoding():
        for _ in range(grpo.group_size):
            samples.append(_trajectory(policy, prompt, grpo, tokenizer, tools, generator, everyone_done, end_ids, stats))
    return _as_rollout(samples, len(prompt), tokenizer.eos_id, policy.device)


def _trajectory(policy: Policy, prompt: list[int], grpo, tokenizer, tools: Tools, generator, everyone_done,
                end_ids: list[int], stats) -> dict:
    device, eos = policy.device, tokenizer.eos_id
    tokens, trained, logps = list(prompt), [], []
    experts: list[list] = []
    cache = policy.new_cache()
    feed, turn_start, turns, sampled = list(prompt), len(prompt), 0, 0
    while True:
        finished = not feed
        if everyone_done is not None and everyone_done(finished):
            break
        if finished and everyone_done is None:
            break
        if finished:  # this rank is done, others are not: a throwaway forward keeps the collectives in step
            policy.forward(torch.tensor([[eos]], device=device), torch.zeros(1, 1, dtype=torch.long, device=device),
                           policy.new_cache())
            continue
        start = len(tokens) - len(feed)
        positions = torch.arange(start, len(tokens), device=device)[None]
        last, routed = policy.forward(torch.tensor([feed], device=device), positions, cache)
        experts = [(parts or []) + [x] for parts, x in zip(experts or [None] * len(routed), routed)]
        logits = last / grpo.temperature
        choice = int(torch.multinomial(filter_logits(logits, grpo.top_k, grpo.top_p).softmax(-1).cpu(), 1,
                                       generator=generator))
        logps.append(float(logits.log_softmax(-1)[0, choice]))
        tokens.append(choice)
        trained.append(True)
        sampled += 1
        feed = [choice]
        if choice == eos or sampled >= grpo.max_new_tokens or len(tokens) >= policy.model.cfg.max_positions:
            feed = []
        elif tokens[-len(end_ids):] == end_ids and turns < grpo.max_turns:
            turns += 1
            calls = TOOL_CALL.findall(tokenizer.decode(tokens[turn_start:]))
            outcome = tools.run(calls[-1].strip() if calls else "")
            if stats is not None:
                stats.tool_calls += 1
                stats.good_tool_calls += outcome.well_formed
            response = tokenizer.encode(RESPONSE.format(outcome.text))
            if len(tokens) + len(response) >= policy.model.cfg.max_positions:
                feed = []
            else:
                tokens += response
                trained += [False] * len(response)
                logps += [0.0] * len(response)
                feed += response
                turn_start = len(tokens)
    experts = [None if parts is None or parts[0] is None else torch.cat(parts, dim=1) for parts in experts]
    return {"tokens": tokens, "trained": trained, "logprobs": logps, "experts": experts}


def _as_rollout(samples: list[dict], prompt_len: int, eos: int, device) -> Rollout:
    width = max(len(s["tokens"]) for s in samples)
    tokens = torch.tensor([s["tokens"] + [eos] * (width - len(s["tokens"])) for s in samples], device=device)
    new = width - prompt_len
    mask = torch.tensor([s["trained"] + [False] * (new - len(s["trained"])) for s in samples], device=device)
    logp = torch.tensor([s["logprobs"] + [0.0] * (new - len(s["logprobs"])) for s in samples], device=device)
    experts = []
    for j in range(len(samples[0]["experts"])):
        if samples[0]["experts"][j] is None:
            experts.append(None)
            continue
        rows = [s["experts"][j] for s in samples]  # padding: −1, routed freely when replayed
        experts.append(torch.cat([torch.cat([r, r.new_full((1, width - 1 - r.shape[1], r.shape[2]), -1)], dim=1)
                                  for r in rows]))
    lengths = torch.tensor([len(s["tokens"]) - prompt_len for s in samples], device=device)
    return Rollout(tokens=tokens, prompt_len=prompt_len, completion_mask=mask, logprobs=logp, experts=experts,
                   lengths=lengths)
