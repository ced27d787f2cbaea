"""Tokenizer, sources and packing: `python -m pytest tests/data/test_text_data.py`."""
from __future__ import annotations

import pytest
import torch

from scimoe.config import Config, DataConfig, ModelConfig
from scimoe.data.packing import pack_documents
from scimoe.data.sources import build_rows
from scimoe.data.text import read_documents
from scimoe.data.tokenizer import EOS


def test_packing_resets_positions_and_masks_document_ends():
    rows = pack_documents([[1, 2, 3], [4, 5, 6, 7, 8], [9]], seq_len=4, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert rows.labels.tolist() == [[2, 3, -100, -100], [6, 7, 8, -100], [-100, -100, -100, -100]]


def test_text_source_trains_a_tokenizer_that_round_trips_and_reuses_it(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Alpha beta gamma.\n\nDelta epsilon, zeta!\n\n\n" * 50)
    cfg = Config(model=ModelConfig(vocab_size=300), data=DataConfig(path=str(corpus)))
    rows = build_rows(cfg, str(tmp_path / "run"))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    first_doc = rows.input_ids[0][: (rows.input_ids[0] == eos).nonzero()[0, 0]]
    assert tok.decode(first_doc.tolist()) == "Alpha beta gamma."
    again = build_rows(cfg, str(tmp_path / "run"))  # loads the saved tokenizer
    assert torch.equal(again.input_ids, rows.input_ids)


def test_vocab_too_small_for_bytes_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_rows(Config(model=ModelConfig(vocab_size=256)), str(tmp_path))


def test_unreadable_corpus_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.txt"):
        read_documents(str(tmp_path / "nope.txt"))


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="data.source"):
        build_rows(Config(data=DataConfig(source="imagenet")), "/tmp")


def test_synthetic_source_is_seeded_and_follows_its_chain(tmp_path):
    cfg = Config(data=DataConfig(source="synthetic", synthetic_rows=8))
    a, b = build_rows(cfg, str(tmp_path)), build_rows(cfg, str(tmp_path))
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (8, cfg.train.seq_len)
    # Every observed successor of a token is one of at most 4.
    pairs = {}
    for ids, labels in zip(a.input_ids.tolist(), a.labels.tolist()):
        for t, nxt in zip(ids, labels):
            if nxt != -100:
                pairs.setdefault(t, set()).add(nxt)
    assert max(len(s) for s in pairs.values()) <= 4
