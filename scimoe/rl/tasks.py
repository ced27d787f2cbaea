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


class TextTokenizer:
    """The run's text tokenizer (a `tokenizers` file or `hf:` folder) as the tasks use it."""

    def __init__(self, path: str, vocab_size: int, trust_remote_code: bool = False) -> None:
        self.tok = load_tokenizer(path, vocab_size, trust_remote_code)
        self.eos_id = self.tok.token_to_id("<|im_end|>")  # an assistant turn ends the completion

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class WordTokenizer:
    """A fixed vocabulary of strings, longest match first; a character outside it becomes `<unk>`. The lookup
    task's: its tool calls, responses and chat turns are a handful of ids, so a tiny model can learn them."""

    def __init__(self, vocabulary: list[str], eos: str) -> None:
        self.vocabulary = vocabulary + ["<unk>"]
        self.ids = {v: i for i, v in enumerate(self.vocabulary)}
        self.eos_id = self.ids[eos]
        self._longest_first = sorted(vocabulary, key=len, reverse=True)

    def encode(self, text: str) -> list[int]:
        out, i, unk = [], 0, self.ids["<unk>"]
        while i < len(text):
            piece = next((v for v in self._longest_first if text.startswith(v, i)), None)
            if piece is None and out and out[-1] == unk:  # a run of unknown characters is one <unk>
                i += 1
                continue
            out.append(self.ids[piece] if piece else unk)
            i += len(piece) if piece else 1
        return out

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocabulary[i] if i < len(self.vocabulary) else "<unk>" for i in ids)


@dataclass
class Task:
    prompts: list[tuple[list[int], str]]
    tokenizer: object

    def batch(self, step: int, count: int, seed: int, rank: int = 0, ranks: int = 1) -> list[tuple[list[int], str]]:
        """This rank's prompts for `step`: a pure function of (seed, step), so resuming needs no state."""
        rng = random.Random(seed * 1_000_003 + step)
        chosen = [self.prompts[rng.randrange(len(self.prompts))] for _ in range(count)]
        return chosen[rank::ranks]


LOOKUP_CALL = '{"name": "lookup", "arguments": {"key": '


class LookupTask(Task):
    """`k=3?` → the number the `lookup` tool holds under key 3, a secret drawn anew for every step: only a
    well-formed call with the right key, and copying its answer, earns the reward (no memorising)."""

    def __init__(self, keys: int = 4) -> None:
        vocabulary = ["<|im_end|>", "<|im_start|>", "user", "assistant", "\n", "<tool_call>", "</tool_call>",
                      "<tool_response>", "</tool_response>", LOOKUP_CALL, "}}", "k=", "?", "error", *"0123456789"]
        tok = WordTokenizer(vocabulary, eos="<|im_end|>")
        prompts = [(tok.encode(f"<|im_start|>user\nk={k}?<|im_end|>\n<|im_start|>assistant\n"), str(k))
                   for k in range(keys)]
        super().__init__(prompts, tok)
        self.table: dict[int, str] = {}
        self.tools = {"lookup": self.lookup}

    def demonstrations(self, count: int, rng: random.Random, well_formed: float, right_key: float):
        """(tokens, trained mask) of example trajectories for a supervised warm start: a `well_formed` share of
        the calls are proper JSON, a `right_key` share ask for the prompt's key (else a random one), and every
        answer copies the tool's response. An imperfect start that RL can then improve."""
        from scimoe.rl.tools import RESPONSE

        out = []
        for _ in range(count):
            ids, key = self.prompts[rng.randrange(len(self.prompts))]
            value, asked = str(rng.randrange(10, 100)), key if rng.random() < right_key else str(rng.randrange(len(self.prompts)))
            call = f"<tool_call>{LOOKUP_CALL}{asked}}}}}</tool_call>" if rng.random() < well_formed else \
                f"<tool_call>{asked}</tool_call>"
            parts = [(ids, False), (self.tokenizer.encode(call), True), (self.tokenizer.encode(RESPONSE.format(value)), False),
                     (self.tokenizer.encode(value + "<|im_end|>"), True)]
            out.append(([t for p, _ in parts for t in p], [m for p, m in parts for _ in p]))
        return out

    def lookup(self, key) -> str:
        if not isinstance(key, int) or key not in self.table:
            raise KeyError(f"no key {key!r}")
        return self.table[key]

    def batch(self, step: int, count: int, seed: int, rank: int = 0, ranks: int = 1) -> list[tuple[list[int], str]]:
        rng = random.Random(seed * 7_000_003 + step)
        self.table = {k: str(rng.randrange(10, 100)) for k in range(len(self.prompts))}
        return [(ids, self.table[int(key)]) for ids, key in super().batch(step, count, seed, rank, ranks)]


def addition_task(max_operand: int) -> Task:
    tok = CharTokenizer()
    prompts = [(tok.encode(f"{a}+{b}="), str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    return Task(prompts, tok)


def jsonl_task(path: str, tokenizer_path: str, vocab_size: int, thinking: bool, max_bad_fraction: float,
               streaming: bool = False, max_prompt_tokens: int | None = None, trust_remote_code: bool = False) -> Task:
    """Prompt records of `path` (scimoe/data/records.py: a bad one, or a prompt longer than `max_prompt_tokens`,
    is skipped and reported by line)."""
    tok = TextTokenizer(tokenizer_path, vocab_size, trust_remote_code)

    def parse(record) -> tuple[list[int], str]:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        text = chat.text(chat.render(messages, record.get("tools"), thinking, add_generation_prompt=True))
        ids = tok.encode(text)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than model.max_positions − grpo.max_new_tokens "
                             f"= {max_prompt_tokens}")
        return ids, str(record["answer"])

    bad: list[str] = []
    prompts = read_records(path, parse, bad, streaming)
    check_bad_share(bad, len(prompts), max_bad_fraction, "data.max_bad_fraction", path)
    if not prompts:
        raise ConfigError(f"config error at 'data.path': {path} has no prompts")
    return Task(prompts, tok)


def build_task(cfg) -> Task:
    if cfg.grpo.task == "addition":
        return addition_task(cfg.grpo.addition_max)
    if cfg.grpo.task == "lookup":
        return LookupTask()
    if not cfg.data.path or not cfg.data.tokenizer:
        raise ConfigError("config error at 'grpo.task': jsonl needs data.path (prompts) and data.tokenizer")
    return jsonl_task(cfg.data.path, cfg.data.tokenizer, cfg.model.vocab_size, cfg.sft.thinking,
                      cfg.data.max_bad_fraction, cfg.data.streaming, cfg.model.max_positions - cfg.grpo.max_new_tokens,
                      cfg.data.trust_remote_code)


__all__ = ["Task", "build_task", "CharTokenizer", "EOS"]
