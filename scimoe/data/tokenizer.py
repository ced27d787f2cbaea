"""Byte-level BPE tokenizer trained in-process (no hub download) or loaded from a JSON file.

Tested by `python -m pytest tests/data/test_text_data.py tests/train/test_sft.py`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scimoe.config import ConfigError

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|ts_pad|>", "<think>", "</think>",
                  "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<|vision_start|>",
                  "<|vision_end|>", "<|ts|>", "<|/ts|>", "<TS_CONTEXT>"]
"""Reserved first ids: end of text, chat turns, modality placeholders, reasoning and tool markers, and the
released chat format's image and time-series brackets (scimoe/data/chat.py)."""


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids trained on `texts`; deterministic for the same input."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


class HFTokenizer:
    """A Hugging Face tokenizer folder (through transformers) behind the few `tokenizers` calls scimoe makes."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self._vocab = tok.get_vocab()

    def encode(self, text: str):
        return Encoded(self.tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def get_vocab_size(self) -> int:
        return len(self.tok)


class Encoded:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


def load_hf_tokenizer(folder: str, trust_remote_code: bool = False) -> HFTokenizer:
    """`data.tokenizer=hf:FOLDER`: the folder's tokenizer through transformers. Code shipped in the folder (its
    tokenizer_config.json's auto_map) runs only with data.trust_remote_code=true."""
    import json

    config = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config):
        raise ConfigError(f"config error at 'data.tokenizer': {config} is missing: not a Hugging Face tokenizer folder")
    with open(config) as f:
        settings = json.load(f)
    remote = (settings.get("auto_map") or {}).get("AutoTokenizer")
    if remote and not trust_remote_code:
        module = next(r for r in (remote if isinstance(remote, list) else [remote]) if r).split(".")[0]
        raise ConfigError(f"config error at 'data.trust_remote_code': {folder} ships its own tokenizer code "
                          f"({module}.py); set data.trust_remote_code=true to run it")
    files = set(os.listdir(folder))
    if "tokenizer.json" not in files and not ({"vocab.json", "merges.txt"} <= files) and "tokenizer.model" not in files:
        raise ConfigError(f"config error at 'data.tokenizer': {folder} has no tokenizer.json, vocab.json + merges.txt "
                          "or tokenizer.model")
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                         local_files_only=True))
    except (OSError, ValueError) as err:
        raise ConfigError(f"config error at 'data.tokenizer': {folder} does not load: {err}") from err


def load_tokenizer(path: str, vocab_size: int, trust_remote_code: bool = False, size_key: str = "model.vocab_size"):
    """A `tokenizers` JSON file, or `hf:FOLDER`, checked against the model's vocabulary (`size_key` names where
    `vocab_size` came from in the error)."""
    tok = load_hf_tokenizer(path[3:], trust_remote_code) if path.startswith("hf:") else Tokenizer.from_file(path)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer {path} has {tok.get_vocab_size()} ids but {size_key} is {vocab_size}")
    if tok.token_to_id(EOS) is None:
        raise ValueError(f"tokenizer {path} has no {EOS} token")
    return tok


def tokenizer_for_run(cfg, run_dir: str, texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The run's tokenizer: `data.tokenizer`, else the one this run folder saved earlier (a resumed run keeps its
    ids), else a byte-level BPE trained on `texts()` and saved as `run_dir/tokenizer.json`. Checked against
    model.vocab_size whichever it is."""
    path = run_tokenizer_path(cfg, run_dir)
    if path:
        return load_tokenizer(path, cfg.model.vocab_size, cfg.data.trust_remote_code)
    tok = train_bpe(texts(), cfg.model.vocab_size)
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(f"config error at 'model.vocab_size': {cfg.model.vocab_size} is too small for a byte-level "
                          f"BPE: it needs at least {tok.get_vocab_size()} ids (256 bytes + special tokens)")
    os.makedirs(run_dir, exist_ok=True)
    saved = os.path.join(run_dir, "tokenizer.json")
    tmp = f"{saved}.tmp{os.getpid()}"  # every rank may train the same one: each renames its own copy
    tok.save(tmp)
    os.replace(tmp, saved)
    return tok


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "vocab.json", "merges.txt", "tokenizer.model")
"""What a Hugging Face tokenizer folder may hold; checkpoints and exports carry whichever the run's tokenizer has."""


def tokenizer_files(path: str | None) -> dict[str, bytes]:
    """The files of tokenizer `path` (a tokenizers JSON file, or `hf:FOLDER`) to store beside weights, by name. A
    plain JSON file also gets a tokenizer_config.json, so that transformers' AutoTokenizer reads the folder."""
    if not path:
        return {}
    if path.startswith("hf:"):
        folder = path[3:]
        return {name: open(os.path.join(folder, name), "rb").read() for name in HF_TOKENIZER_FILES
                if os.path.isfile(os.path.join(folder, name))}
    import json

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
              "extra_special_tokens": SPECIAL_TOKENS[1:], "model_max_length": 1 << 30}
    return {"tokenizer.json": open(path, "rb").read(), "tokenizer_config.json": json.dumps(config, indent=1).encode()}


def stored_tokenizer(folder: str) -> str | None:
    """The tokenizer stored beside weights in `folder` (a checkpoint or a Hugging Face folder), as data.tokenizer
    takes it, or None: its tokenizer.json (read by `tokenizers`, as training read it), else `hf:FOLDER` when
    transformers can read the folder (vocab.json + merges.txt, tokenizer.model)."""
    plain = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(plain):
        return plain
    return f"hf:{folder}" if os.path.isfile(os.path.join(folder, "tokenizer_config.json")) else None


def run_tokenizer_path(cfg, run_dir: str) -> str | None:
    """The tokenizer a data source must load: `data.tokenizer`, else the run folder's own (a resumed run
    keeps its ids), else the one stored with `checkpoint.init_weights`, else None (train one). Starting from
    weights without any is an error: those weights only make sense with the tokenizer they were trained with."""
    saved = os.path.join(run_dir, "tokenizer.json")
    path = cfg.data.tokenizer or (saved if os.path.exists(saved) else None)
    if path is None and cfg.checkpoint.init_weights:
        path = stored_tokenizer(cfg.checkpoint.init_weights.removeprefix("hf:"))
    if path is None and cfg.checkpoint.init_weights:
        raise ConfigError("config error at 'data.tokenizer': checkpoint.init_weights needs the tokenizer those "
                         "weights were trained with (e.g. data.tokenizer=PRETRAIN_RUN/tokenizer.json)")
    return path
