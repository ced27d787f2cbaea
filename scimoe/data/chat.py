"""Intern-S1-Pro's chat format (DESIGN.md §5), rendered by our own code into segments that say which
tokens the SFT loss trains on.

Tested by `python -m pytest tests/data/test_chat.py` (golden strings and the loss mask token by token).
A conversation is rendered as ChatML turns `<|im_start|>{role}\\n…<|im_end|>\\n`:
- system: its content, then (when tools are given) the tool signatures as JSON lines in `<tools></tools>`;
- user: text, with `<|image_pad|>` / `<|ts_pad|>` for image and time-series content items;
- assistant: `<think>\\n{reasoning}\\n</think>\\n\\n` (thinking on) or the prompt-side `<think></think>\\n\\n`
  (thinking off), the content, then each call as `<tool_call>\\n{"name": …, "arguments": …}\\n</tool_call>`;
- tool: consecutive tool messages become one user turn of `<tool_response>\\n…\\n</tool_response>` blocks.
Trained: everything an assistant turn writes after `<|im_start|>assistant\\n` (and after the empty think
block with thinking off) up to and including its `<|im_end|>`. Not trained: system, user, tool responses,
the turn headers and the newline after `<|im_end|>`.
"""
from __future__ import annotations

import json
from typing import Any

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
ROLES = ("system", "user", "assistant", "tool")
PLACEHOLDERS = {"image": "<|image_pad|>", "time_series": "<|ts_pad|>"}

Segment = tuple[str, bool]
"""(text, trained)."""


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (the message says which field)."""


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(f"messages[{index}].content must be a string or a list of items")
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            parts.append(item.get("text", ""))
        elif kind in PLACEHOLDERS:
            parts.append(PLACEHOLDERS[kind])
        else:
            raise ChatFormatError(f"messages[{index}].content: unknown item type {kind!r}")
    return "".join(parts)


def _tool_call(call: dict[str, Any], index: int) -> str:
    function = call.get("function", call)
    if "name" not in function:
        raise ChatFormatError(f"messages[{index}].tool_calls: a call without a name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as err:
            raise ChatFormatError(f"messages[{index}].tool_calls: arguments are not JSON: {err}") from err
    return "<tool_call>\n" + json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False) + \
        "\n</tool_call>"


def render(messages: list[dict[str, Any]], tools: list[dict] | None = None, thinking: bool = True,
           add_generation_prompt: bool = False) -> list[Segment]:
    """The conversation as (text, trained) segments; joined, they are the exact model input."""
    if not messages:
        raise ChatFormatError("messages is empty")
    out: list[Segment] = []
    start = 0
    if messages[0].get("role") == "system" or tools:
        system = _content(messages[0], 0) if messages[0].get("role") == "system" else ""
        start = 1 if messages[0].get("role") == "system" else 0
        if tools:
            lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            system = (system + "\n\n" if system else "") + f"{TOOLS_HEADER}\n{lines}\n{TOOLS_FOOTER}"
        out.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
    i = start
    while i < len(messages):
        message, role = messages[i], messages[i].get("role")
        if role not in ROLES or (role == "system" and i > 0):
            raise ChatFormatError(f"messages[{i}].role: {role!r} is not one of {ROLES} (system only first)")
        if role == "user":
            out.append((f"<|im_start|>user\n{_content(message, i)}<|im_end|>\n", False))
        elif role == "tool":
            blocks = []
            while i < len(messages) and messages[i].get("role") == "tool":
                blocks.append(f"<tool_response>\n{_content(messages[i], i)}\n</tool_response>")
                i += 1
            out.append(("<|im_start|>user\n" + "\n".join(blocks) + "<|im_end|>\n", False))
            continue
        else:
            out.extend(_assistant(message, i, thinking))
        i += 1
    if add_generation_prompt:
        out.append(("<|im_start|>assistant\n" + ("" if thinking else "<think></think>\n\n"), False))
    return out


def _assistant(message: dict[str, Any], index: int, thinking: bool) -> list[Segment]:
    body = _content(message, index)
    calls = message.get("tool_calls") or []
    if calls:
        body = (body + "\n" if body else "") + "\n".join(_tool_call(c, index) for c in calls)
    if thinking:
        reasoning = message.get("reasoning_content") or ""
        return [("<|im_start|>assistant\n", False), (f"<think>\n{reasoning}\n</think>\n\n{body}<|im_end|>", True),
                ("\n", False)]
    return [("<|im_start|>assistant\n<think></think>\n\n", False), (f"{body}<|im_end|>", True), ("\n", False)]


def text(segments: list[Segment]) -> str:
    return "".join(t for t, _ in segments)


def tokenize(segments: list[Segment], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is trained (segments are tokenized one by one, so a mask
    boundary never falls inside a token)."""
    ids: list[int] = []
    trained: list[bool] = []
    for part, train in segments:
        piece = tokenizer.encode(part).ids if part else []
        ids.extend(piece)
        trained.extend([train] * len(piece))
    return ids, trained
