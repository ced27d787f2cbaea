"""Chat rendering and SFT packing: `python -m pytest tests/data/test_chat.py`."""
from __future__ import annotations

import json

import pytest

from scimoe.data import chat
from scimoe.data.packing import Document, PackReport, pack
from scimoe.data.records import read_records
from scimoe.data.sft import parse_conversation
from scimoe.data.tokenizer import train_bpe

SYSTEM = {"role": "system", "content": "Be brief."}
QUESTION = {"role": "user", "content": "2+2?"}
ANSWER = {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_thinking_on_golden():
    assert chat.text(chat.render([SYSTEM, QUESTION, ANSWER])) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>Two and two.</think>\n\n4<|im_end|>\n")


def test_thinking_off_golden_and_generation_prompt():
    assert chat.text(chat.render([QUESTION, ANSWER], thinking=False)) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think></think>\n\n4<|im_end|>\n")
    assert chat.text(chat.render([QUESTION], thinking=False, add_generation_prompt=True)) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think></think>\n\n")
    assert chat.text(chat.render([QUESTION], add_generation_prompt=True)).endswith("<|im_start|>assistant\n<think>")


def test_tools_and_multi_turn_tool_use_golden():
    messages = [QUESTION,
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
                {"role": "tool", "content": "4"}, {"role": "tool", "content": "ok"},
                {"role": "assistant", "content": "4"}]
    assert chat.text(chat.render(messages, tools=TOOLS, thinking=False)) == (
        "<|im_start|>system\n" + chat.TOOLS_HEADER + "\n"
        '{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}\n'
        + chat.TOOLS_FOOTER + "<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 2}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\n\n4<|im_end|>\n")
    assert "You are provided with function signatures within <tools></tools> XML tags" in chat.TOOLS_HEADER


def _released_tokenizer():
    """The released Intern-S1-Pro vocabulary as a byte-level BPE (tests/fixtures/released, see docs/fixtures.md)."""
    import gzip
    import os

    from tokenizers import Tokenizer

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "released", "released_bpe.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return Tokenizer.from_str(f.read())


def test_our_renderer_gives_the_released_templates_token_ids():
    """Eight conversations rendered by the released chat_template.jinja and tokenized by the released tokenizer
    (transformers 4.57.1, trust_remote_code; tests/fixtures/released/released_chat.json): thinking on and off,
    tools with calls (object and string arguments) and responses, earlier turns' reasoning dropped, an earlier
    tool call with no think block, images and a series, generation prompts both ways."""
    import os

    cases = json.load(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "released",
                                        "released_chat.json")))
    tok = _released_tokenizer()
    assert len(cases) == 8
    for name, case in cases.items():
        segments = chat.render(case["messages"], case.get("tools"), case.get("enable_thinking", True),
                               case.get("add_generation_prompt", False))
        assert chat.text(segments) == case["released_text"], name
        assert chat.tokenize(segments, tok)[0] == case["released_ids"], name


def test_the_loss_mask_covers_exactly_the_assistant_spans_token_by_token():
    messages = [SYSTEM, QUESTION, {"role": "assistant", "reasoning_content": "Use the tool.",
                                   "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 2}}]},
                {"role": "tool", "content": "4"}, ANSWER]
    segments = chat.render(messages, tools=TOOLS)
    tok = train_bpe([chat.text(segments)] * 3, 300)
    ids, trained = chat.tokenize(segments, tok)
    assert tok.decode(ids, skip_special_tokens=False) == chat.text(segments)
    spans, current = [], []
    for token, ok in zip(ids, trained):
        if ok:
            current.append(token)
        elif current:
            spans.append(tok.decode(current, skip_special_tokens=False))
            current = []
    assert spans == ['<think>Use the tool.</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}'
                     '\n</tool_call><|im_end|>', "<think>Two and two.</think>\n\n4<|im_end|>"]
    # Labels: the token before each trained token predicts it; nothing else carries a label.
    report = PackReport()
    rows = pack([Document(ids, trained)], 512, 0, "truncate", report)
    labels = rows.labels[0].tolist()
    for t in range(len(ids) - 1):
        assert labels[t] == (ids[t + 1] if trained[t + 1] else -100), t
    assert report.trained_tokens == sum(trained) and rows.positions[0, len(ids) - 1] == len(ids) - 1


def test_packing_truncation_and_drop_are_counted():
    convs = [Document([1, 2, 3], [False, True, True]), Document([4] * 10, [True] * 10), Document([5, 6], [False, True])]
    report = PackReport()
    rows = pack(convs, 6, 0, "truncate", report)
    assert report.truncated == 1 and rows.input_ids.tolist() == [[1, 2, 3, 0, 0, 0], [4] * 6, [5, 6, 0, 0, 0, 0]]
    assert rows.positions.tolist()[0] == [0, 1, 2, 0, 0, 0]
    report = PackReport()
    rows = pack(convs, 6, 0, "drop", report)
    assert len(report.dropped) == 1 and rows.input_ids.tolist() == [[1, 2, 3, 5, 6, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 0, 1, 0]]  # two conversations, positions restart
    assert rows.labels.tolist() == [[2, 3, -100, 6, -100, -100]]


def test_bad_records_are_skipped_with_file_and_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [QUESTION, ANSWER]}
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"messages": [{"role": "robot"}]}),
                               json.dumps({"text": "no messages"}), json.dumps(good)]) + "\n")
    bad: list[str] = []
    records = read_records(str(path), parse_conversation, bad)
    assert len(records) == 2
    assert [b.split(": ")[0] for b in bad] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "'robot' is not one of" in bad[1]
    with pytest.raises(chat.ChatFormatError, match=r"messages\[0\].content: unknown item type 'audio'"):
        chat.render([{"role": "user", "content": [{"type": "audio"}]}])
    assert chat.text(chat.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}])) \
        == "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n"
