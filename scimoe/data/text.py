"""Plain-text corpus source: paragraphs are documents, tokenized and packed.

Tested by `python -m pytest tests/data/test_text_data.py`. The bundled corpus is
`scimoe/data/corpus/stdlib_docs.txt` (see tools/make_corpus.py).
"""
from __future__ import annotations

import os
from importlib import resources

from scimoe.data.packing import PackedRows, pack_documents
from scimoe.data.tokenizer import EOS, load_tokenizer, train_bpe, run_tokenizer_path


def bundled_corpus_path() -> str:
    return str(resources.files("scimoe.data") / "corpus" / "stdlib_docs.txt")


def read_documents(path: str) -> list[str]:
    """Blank-line separated, non-empty paragraphs of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"data.path: cannot read corpus '{path}': {err}") from err
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"data.path: corpus '{path}' has no text")
    return docs


def text_rows(cfg, run_dir: str) -> PackedRows:
    """Tokenize the corpus (training the tokenizer on it unless one is given) and pack it.

    The tokenizer is saved as `run_dir/tokenizer.json`; a resumed run reuses that file, so its ids
    cannot drift from the checkpoint's.
    """
    docs = read_documents(cfg.data.path or bundled_corpus_path())
    saved = os.path.join(run_dir, "tokenizer.json")
    path = run_tokenizer_path(cfg, run_dir)
    if path:
        tok = load_tokenizer(path, cfg.model.vocab_size)
    else:
        tok = train_bpe(docs, cfg.model.vocab_size)
        if tok.get_vocab_size() > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is too small for a byte-level BPE: it needs "
                             f"at least {tok.get_vocab_size()} ids (256 bytes + special tokens)")
        os.makedirs(run_dir, exist_ok=True)
        tmp = f"{saved}.tmp{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, saved)
    eos = tok.token_to_id(EOS)
    ids = [enc.ids + [eos] for enc in tok.encode_batch(docs)]
    return pack_documents(ids, cfg.train.seq_len, pad_id=eos)
