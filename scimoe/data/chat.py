"""Intern-S1-Pro's chat format as the released `chat_template.jinja` renders it, by our own code into segments
that say which tokens the SFT loss trains on.

Tested by `python -m pytest tests/data/test_chat.py` (golden strings, the loss mask token by token, and the
strings the released template renders for the same conversations, stored as a fixture). A conversation is
ChatML turns `<|im_start|>{role}\n…<|im_end|>\n`, as the release writes them:
- system: its content, then (when tools are given) the tool signatures as JSON lines in `<tools></tools>`;
- user: text; an image item is `Picture N: <|vision_start|><|image_pad|><|vision_end|>` (N counts the
  conversation's images), a time-series item `<|ts|><TS_CONTEXT><|/ts|>` (how LMDeploy's Intern-S1-Pro marks one;
  the released template has no time-series items);
- assistant: after the last real user query, `<think>{reasoning}</think>\n\n` (no newlines inside) when the turn
  has reasoning or is the last one, then the content; earlier turns show their content only (their reasoning is
  dropped, as the released model saw it); then each call as `<tool_call>\n{"name": "…", "arguments": …}\n</tool_call>`;
- tool: consecutive tool messages become one user turn of `<tool_response>\n…\n</tool_response>` blocks.
The generation prompt ends `<|im_start|>assistant\n<think>` (thinking on) or `…<think></think>\n\n` (off).
Trained: everything an assistant turn writes after `<|im_start|>assistant\n` up to and including its
`<|im_end|>` (with thinking off, the empty think block is prompt-side). Not trained: system, user, tool
responses, the turn headers and the newline after `<|im_end|>`.
"""
from __future__ import annotations

import json
import re
from typing import Any

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
ROLES = ("system", "user", "assistant", "tool")
PLACEHOLDERS = {"image": "<|vision_start|><|image_pad|><|vision_end|>", "time_series": "<|ts|><TS_CONTEXT><|/ts|>"}

Segment = tuple[str, bool]
"""(text, trained)."""


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (the message says which field)."""


def _content(message: dict[str, Any], index: int, images: list[int] | None = None) -> str:
    """A message's text; `images` (a one-element counter) numbers the pictures as the release does."""
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
        elif kind == "image":
            if images is not None:
                images[0] += 1
            parts.append(f"Picture {images[0] if images else 0}: {PLACEHOLDERS['image']}")
        elif kind == "time_series":
            parts.append(PLACEHOLDERS["time_series"])
        else:
            raise ChatFormatError(f"messages[{index}].content: unknown item type {kind!r}")
    return "".join(parts)


def _tool_call(call: dict[str, Any], index: int) -> str:
    function = call.get("function", call)
    if "name" not in function:
        raise ChatFormatError(f"messages[{index}].tool_calls: a call without a name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # written as given, as the release does; it must still be JSON
        try:
            json.loads(arguments)
        except ValueError as err:
            raise ChatFormatError(f"messages[{index}].tool_calls: arguments are not JSON: {err}") from err
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n</tool_call>'


def _last_query(messages: list[dict[str, Any]]) -> int:
    """Index of the last user message that is not wholly a tool response (the release's last_query_index)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            content = _content(messages[i], i)
            if not (content.startswith("<tool_response>") and content.endswith("</tool_response>")):
                return i
    return len(messages) - 1


def render(messages: list[dict[str, Any]], tools: list[dict] | None = None, thinking: bool = True,
           add_generation_prompt: bool = False) -> list[Segment]:
    """The conversation as (text, trained) segments; joined, they are the exact model input."""
    if not messages:
        raise ChatFormatError("messages is empty")
    out: list[Segment] = []
    has_system = messages[0].get("role") == "system"
    if tools:
        system = (_content(messages[0], 0) + "\n\n") if has_system else ""
        lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        out.append((f"<|im_start|>system\n{system}{TOOLS_HEADER}{lines}\n{TOOLS_FOOTER}<|im_end|>\n", False))
    elif has_system:
        out.append((f"<|im_start|>system\n{_content(messages[0], 0)}<|im_end|>\n", False))
    last_query, images = _last_query(messages), [0]
    i = 1 if has_system else 0
    while i < len(messages):
        message, role = messages[i], messages[i].get("role")
        if role not in ROLES or (role == "system" and i > 0):
            raise ChatFormatError(f"messages[{i}].role: {role!r} is not one of {ROLES} (system only first)")
        if role == "user":
            out.append((f"<|im_start|>user\n{_content(message, i, images)}<|im_end|>\n", False))
        elif role == "tool":
            blocks = []
            while i < len(messages) and messages[i].get("role") == "tool":
                blocks.append(f"\n<tool_response>\n{_content(messages[i], i, images)}\n</tool_response>")
                i += 1
            out.append(("<|im_start|>user" + "".join(blocks) + "<|im_end|>\n", False))
            continue
        else:
            out.extend(_assistant(message, i, thinking, i > last_query, i == len(messages) - 1, images))
        i += 1
    if add_generation_prompt:
        out.append(("<|im_start|>assistant\n" + ("<think>" if thinking else "<think></think>\n\n"), False))
    return out


def _assistant(message: dict[str, Any], index: int, thinking: bool, after_query: bool, last: bool,
               images: list[int]) -> list[Segment]:
    body = _content(message, index, images)
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in body:
            reasoning = body.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            body = body.split("</think>")[-1].lstrip("\n")
    if not thinking:
        reasoning = ""
    think = ""
    if after_query and (last or reasoning):
        think, body = f"<think>{reasoning.strip(chr(10))}</think>\n\n", body.lstrip("\n")
    calls = message.get("tool_calls") or []
    for n, call in enumerate(calls):
        body += ("\n" if body or n else "") + _tool_call(call, index)
    if not thinking and think:  # the empty think block is what the generation prompt wrote
        return [("<|im_start|>assistant\n" + think, False), (f"{body}<|im_end|>", True), ("\n", False)]
    return [("<|im_start|>assistant\n", False), (f"{think}{body}<|im_end|>", True), ("\n", False)]


ASSISTANT_TURN = re.compile(r"(<\|im_start\|>assistant\n)(.*?<\|im_end\|>)", re.S)


def segments_of(rendered: str) -> list[Segment]:
    """A conversation some other renderer wrote (a folder's own chat template) as segments: each assistant turn's
    body up to and including its `<|im_end|>` trained, everything else not."""
    out: list[Segment] = []
    end = 0
    for match in ASSISTANT_TURN.finditer(rendered):
        out.append((rendered[end:match.start(2)], False))
        out.append((match.group(2), True))
        end = match.end()
    out.append((rendered[end:], False))
    return [(t, trained) for t, trained in out if t]


def render_with(template_tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                thinking: bool = True, add_generation_prompt: bool = False) -> list[Segment]:
    """The conversation as a Hugging Face tokenizer's own chat template renders it (`sft.chat_template=folder`)."""
    rendered = template_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      enable_thinking=thinking)
    return segments_of(rendered)


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
