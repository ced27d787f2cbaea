"""SFT data: chat JSONL (or a built-in synthetic chat set) → rendered, tokenized, packed rows whose labels
cover only assistant tokens.

Tested by `python -m pytest tests/data/test_chat.py tests/train/test_sft.py`. Records are JSON objects
with `messages` (and optional `tools`, `thinking`); a line that is not JSON or does not render is skipped
and reported with its file and line; more than `sft.max_bad_fraction` of them stops the run. Several
conversations share a row, positions restarting at 0 for each; one longer than `train.seq_len` is
truncated (keeping its start) or dropped, as `sft.truncation` says, and counted.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field

import torch

from scimoe.data import chat
from scimoe.data.packing import PackedRows
from scimoe.data.tokenizer import EOS, load_tokenizer, train_bpe, run_tokenizer_path

log = logging.getLogger("scimoe")


@dataclass
class SFTReport:
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    bad: list[str] = field(default_factory=list)
    """`file:line: why` of every skipped record."""
    trained_tokens: int = 0
    tokens: int = 0


def read_conversations(path: str, report: SFTReport) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                    raise chat.ChatFormatError("no 'messages' list")
                chat.render(record["messages"], record.get("tools"))  # validate now, skip if broken
                records.append(record)
            except (ValueError, TypeError, AttributeError) as err:
                report.bad.append(f"{path}:{number}: {err}")
    return records


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


def pack_conversations(convs: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, truncation: str,
                       report: SFTReport) -> PackedRows:
    """Whole conversations per row (a new row when one does not fit); labels are the next token where
    that token is trained, −100 elsewhere; positions restart per conversation."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []

    def close_row() -> None:
        pad = seq_len - len(ids)
        rows.append((ids + [pad_id] * pad, pos + [0] * pad, lab + [-100] * pad))

    for tokens, trained in convs:
        if len(tokens) > seq_len:
            if truncation == "drop":
                report.dropped += 1
                continue
            tokens, trained = tokens[:seq_len], trained[:seq_len]
            report.truncated += 1
        if len(ids) + len(tokens) > seq_len:
            close_row()
            ids, pos, lab = [], [], []
        ids += tokens
        pos += range(len(tokens))
        lab += [t if ok else -100 for t, ok in zip(tokens[1:], trained[1:])] + [-100]
        report.trained_tokens += sum(trained[1:])
        report.tokens += len(tokens)
    if ids:
        close_row()
    if not rows:
        raise ValueError("SFT data produced no rows (every conversation dropped: see sft.truncation)")
    return PackedRows(*(torch.tensor([r[k] for r in rows]) for k in range(3)))


def sft_rows(cfg, run_dir: str) -> PackedRows:
    """The `sft` data source: `data.path` (chat JSONL) or, when unset, `data.synthetic_rows` synthetic chats."""
    report = SFTReport()
    if cfg.data.path:
        records = read_conversations(cfg.data.path, report)
        total = len(records) + len(report.bad)
        for line in report.bad[:20]:
            log.warning("skipped %s", line)
        if total and len(report.bad) / total > cfg.sft.max_bad_fraction:
            raise ValueError(f"{len(report.bad)} of {total} records of {cfg.data.path} are bad (first: {report.bad[0]}), "
                             f"more than sft.max_bad_fraction={cfg.sft.max_bad_fraction}")
    else:
        records = synthetic_conversations(cfg.data.synthetic_rows, cfg.train.seed)
    segments = [chat.render(r["messages"], r.get("tools"), r.get("thinking", cfg.sft.thinking)) for r in records]
    saved = os.path.join(run_dir, "tokenizer.json")
    path = run_tokenizer_path(cfg, run_dir)
    if path:
        tok = load_tokenizer(path, cfg.model.vocab_size)
    else:
        tok = train_bpe([chat.text(s) for s in segments], cfg.model.vocab_size)
        os.makedirs(run_dir, exist_ok=True)
        tok.save(f"{saved}.tmp{os.getpid()}")
        os.replace(f"{saved}.tmp{os.getpid()}", saved)
    convs = [chat.tokenize(s, tok) for s in segments]
    report.conversations = len(convs)
    rows = pack_conversations(convs, cfg.train.seq_len, tok.token_to_id(EOS), cfg.sft.truncation, report)
    log.info("sft data: %d conversations in %d rows, %d of %d tokens trained, %d truncated, %d dropped, %d bad records",
             report.conversations, len(rows), report.trained_tokens, report.tokens, report.truncated, report.dropped,
             len(report.bad))
    return rows
