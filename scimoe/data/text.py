"""Plain-text corpus source: paragraphs are documents, tokenized and packed.

Tested by `python -m pytest tests/data/test_text_data.py`. The bundled corpus is
`scimoe/data/corpus/stdlib_docs.txt` (see tools/make_corpus.py).
"""
from __future__ import annotations

from importlib import resources

from scimoe.config import ConfigError
from scimoe.data.packing import PackedRows, pack_documents
from scimoe.data.tokenizer import EOS, tokenizer_for_run


def bundled_corpus_path() -> str:
    return str(resources.files("scimoe.data") / "corpus" / "stdlib_docs.txt")


def read_documents(path: str) -> list[str]:
    """Blank-line separated, non-empty paragraphs of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config error at 'data.path': cannot read corpus '{path}': {err}") from err
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise ConfigError(f"config error at 'data.path': corpus '{path}' has no text")
    return docs


def text_rows(cfg, run_dir: str) -> PackedRows:
    """Tokenize the corpus (with the run's tokenizer, trained on the corpus unless one is given) and pack it."""
    docs = read_documents(cfg.data.path or bundled_corpus_path())
    tok = tokenizer_for_run(cfg, run_dir, lambda: docs)
    eos = tok.token_to_id(EOS)
    ids = [enc.ids + [eos] for enc in tok.encode_batch(docs)]
    return pack_documents(ids, cfg.train.seq_len, pad_id=eos)
