"""Prompt sources for GRPO: (prompt token ids, reference answer) pairs, with the tokenizer that reads them.

`addition` is the built-in toy task (`a+b=` → the digit a+b, a character vocabulary, learnable from scratch
on a CPU); `jsonl` reads `data.path` records `{"prompt": str or "messages": [...], "answer": str}`, rendered
in the chat format with the generation prompt and tokenized with `data.tokenizer` (e.g. the SFT run's).
Tested by `python -m pytest tests/rl`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from scimoe.config import ConfigError
from scimoe.data import chat
from scimoe.data.records import check_bad_share, read_records
from scimoe.data.tokenizer import EOS, load_tokenizer


class CharTokenizer:
    """Digits, '+', '=' and EOS: the addition task's vocabulary (ids 0..12)."""

    chars = "0123456789+="

    def __init__(self) -> None:
        self.eos_id = len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "" for i in ids)


class HFTokenizer:
    def __init__(self, path: str, vocab_size: int) -> None:
        self.tok = load_tokenizer(path, vocab_size)
        self.eos_id = self.tok.token_to_id("<|im_end|>")  # an assistant turn ends the completion

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


@dataclass
class Task:
    prompts: list[tuple[list[int], str]]
    tokenizer: object

    def batch(self, step: int, count: int, seed: int, rank: int = 0, ranks: int = 1) -> list[tuple[list[int], str]]:
        """This rank's prompts for `step`: a pure function of (seed, step), so resuming needs no state."""
        rng = random.Random(seed * 1_000_003 + step)
        chosen = [self.prompts[rng.randrange(len(self.prompts))] for _ in range(count)]
        return chosen[rank::ranks]


def addition_task(max_operand: int) -> Task:
    tok = CharTokenizer()
    prompts = [(tok.encode(f"{a}+{b}="), str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    return Task(prompts, tok)


def jsonl_task(path: str, tokenizer_path: str, vocab_size: int, thinking: bool, max_bad_fraction: float,
               streaming: bool = False) -> Task:
    """Prompt records of `path` (scimoe/data/records.py: a bad one is skipped and reported by line)."""
    tok = HFTokenizer(tokenizer_path, vocab_size)

    def parse(record) -> tuple[list[int], str]:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        text = chat.text(chat.render(messages, record.get("tools"), thinking, add_generation_prompt=True))
        return tok.encode(text), str(record["answer"])

    bad: list[str] = []
    prompts = read_records(path, parse, bad, streaming)
    check_bad_share(bad, len(prompts), max_bad_fraction, "data.max_bad_fraction", path)
    if not prompts:
        raise ConfigError(f"config error at 'data.path': {path} has no prompts")
    return Task(prompts, tok)


def build_task(cfg) -> Task:
    if cfg.grpo.task == "addition":
        return addition_task(cfg.grpo.addition_max)
    if not cfg.data.path or not cfg.data.tokenizer:
        raise ConfigError("config error at 'grpo.task': jsonl needs data.path (prompts) and data.tokenizer")
    return jsonl_task(cfg.data.path, cfg.data.tokenizer, cfg.model.vocab_size, cfg.sft.thinking,
                      cfg.data.max_bad_fraction, cfg.data.streaming)


__all__ = ["Task", "build_task", "CharTokenizer", "EOS"]
