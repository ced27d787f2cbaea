"""SFT data: chat JSONL (or a built-in synthetic chat set) → rendered, tokenized, packed rows whose labels
cover only assistant tokens.

Tested by `python -m pytest tests/data/test_chat.py tests/train/test_sft.py`. Records are JSON objects
with `messages` (and optional `tools`, `thinking`); a line that is not JSON or does not render is skipped
and reported with its file and line; more than `sft.max_bad_fraction` of them stops the run. Several
conversations share a row, positions restarting at 0 for each; one longer than `train.seq_len` is
truncated (keeping its start) or dropped, as `sft.truncation` says, and counted.
"""
from __future__ import annotations

import logging
import random

from scimoe.config import ConfigError
from scimoe.data import chat
from scimoe.data.packing import Document, PackedRows, PackReport, pack
from scimoe.data.records import check_bad_share, read_records
from scimoe.data.tokenizer import EOS, tokenizer_for_run

log = logging.getLogger("scimoe")


def parse_conversation(record: object) -> dict:
    """A chat record, checked by rendering it (a record that does not render is refused, with the field)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise chat.ChatFormatError("no 'messages' list")
    chat.render(record["messages"], record.get("tools"))
    return record


def synthetic_conversations(count: int, seed: int) -> list[dict]:
    """Arithmetic chats with reasoning, some of them using a calculator tool: learnable, no files."""
    rng = random.Random(seed)
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two integers",
                                                "parameters": {"type": "object", "properties": {
                                                    "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    out = []
    for i in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        question = {"role": "user", "content": f"What is {a} + {b}?"}
        if i % 4 == 3:
            out.append({"tools": tools, "messages": [
                question,
                {"role": "assistant", "reasoning_content": "I will use the add tool.",
                 "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
                {"role": "tool", "content": str(a + b)},
                {"role": "assistant", "reasoning_content": f"The tool says {a + b}.", "content": f"{a} + {b} = {a + b}."}]})
        else:
            out.append({"thinking": i % 4 != 2, "messages": [
                {"role": "system", "content": "You are a careful calculator."}, question,
                {"role": "assistant", "reasoning_content": f"{a} plus {b} is {a + b}.", "content": f"{a} + {b} = {a + b}."}]})
    return out


def sft_rows(cfg, run_dir: str) -> PackedRows:
    """The `sft` data source: `data.path` (chat JSONL) or, when unset, `data.synthetic_rows` synthetic chats."""
    bad: list[str] = []
    if cfg.data.path:
        records = read_records(cfg.data.path, parse_conversation, bad, cfg.data.streaming)
        check_bad_share(bad, len(records), cfg.sft.max_bad_fraction, "sft.max_bad_fraction", cfg.data.path)
    else:
        records = synthetic_conversations(cfg.data.synthetic_rows, cfg.train.seed)
    if cfg.sft.chat_template == "folder":
        if not (cfg.data.tokenizer or "").startswith("hf:"):
            raise ConfigError("config error at 'sft.chat_template': folder needs data.tokenizer=hf:FOLDER")
        tok = tokenizer_for_run(cfg, run_dir, lambda: [])
        segments = [chat.render_with(tok.tok, r["messages"], r.get("tools"), r.get("thinking", cfg.sft.thinking))
                    for r in records]
    else:
        segments = [chat.render(r["messages"], r.get("tools"), r.get("thinking", cfg.sft.thinking)) for r in records]
        tok = tokenizer_for_run(cfg, run_dir, lambda: [chat.text(s) for s in segments])
    docs = [Document(*chat.tokenize(s, tok), where=f"{cfg.data.path or 'synthetic'}: conversation {i + 1}")
            for i, s in enumerate(segments)]
    report = PackReport()
    rows = pack(docs, cfg.train.seq_len, tok.token_to_id(EOS), cfg.sft.truncation, report)
    log.info("sft data: %d conversations in %d rows, %d of %d tokens trained, %d truncated, %d dropped, %d bad records",
             len(docs), len(rows), report.trained_tokens, report.tokens, report.truncated, len(report.dropped), len(bad))
    return rows
