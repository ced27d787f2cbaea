"""Megatron .bin/.idx data, blending and scimoe-preprocess: `python -m pytest tests/data/test_indexed.py`."""
from __future__ import annotations

import json

import pytest
import torch

from scimoe.config import Config, DataConfig, TrainConfig
from scimoe.data.indexed import blend_indices, indexed_rows, read_indexed, write_indexed
from scimoe.data.loader import StepLoader
from scimoe.data.preprocess import main, preprocess
from scimoe.train.pretrain import pretrain


def test_documents_round_trip_and_megatron_reads_them(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [[5, 6, 7, 0], [9, 0], list(range(10, 300)) + [0]]
    stats = write_indexed(str(tmp_path / "d"), docs, vocab_size=384)
    assert stats["documents"] == 3 and stats["tokens"] == 4 + 2 + 291 and stats["max_length"] == 291
    assert read_indexed(str(tmp_path / "d")) == docs
    megatron = IndexedDataset(str(tmp_path / "d"))
    assert len(megatron) == 3 and megatron[2].tolist() == docs[2]
    assert megatron.document_indices.tolist() == [0, 1, 2, 3]


def test_blending_follows_the_weights():
    chosen = blend_indices([3.0, 1.0], [100, 100], 40)
    assert sum(d == 0 for d, _ in chosen) == 30 and sum(d == 1 for d, _ in chosen) == 10
    assert [r for d, r in chosen if d == 1] == list(range(10))  # each dataset in order
    small = blend_indices([1.0, 1.0], [2, 50], 10)
    assert [r for d, r in small if d == 0] == [0, 1, 0, 1, 0]  # a small dataset starts over


def _cfg(tmp_path, **data) -> Config:
    return Config(data=DataConfig(source="indexed", **data), train=TrainConfig(seq_len=32, global_batch=4, micro_batch=1))


def test_the_indexed_source_blends_and_its_loader_resumes_per_rank(tmp_path):
    write_indexed(str(tmp_path / "a"), [[7] * 20 + [0]] * 40, vocab_size=384)
    write_indexed(str(tmp_path / "b"), [[9] * 20 + [0]] * 40, vocab_size=384)
    rows = indexed_rows(_cfg(tmp_path, blend=[2.0, str(tmp_path / "a"), 1.0, str(tmp_path / "b")]), str(tmp_path))
    share_a = float((rows.input_ids == 7).sum()) / float(((rows.input_ids == 7) | (rows.input_ids == 9)).sum())
    assert abs(share_a - 2 / 3) < 0.05
    for rank in (0, 1):
        whole = StepLoader(rows, 4, 1, seed=3, dp_rank=rank, dp_size=2)
        want = [whole.next_step() for _ in range(6)]
        cut = StepLoader(rows, 4, 1, seed=3, dp_rank=rank, dp_size=2)
        cut.next_step(), cut.next_step()
        resumed = StepLoader(rows, 4, 1, seed=3, dp_rank=rank, dp_size=2)
        resumed.load_state_dict(json.loads(json.dumps(cut.state_dict())))
        for w in want[2:]:
            for a, b in zip(resumed.next_step(), w):
                assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "positions", "labels"))
    cfg = _cfg(tmp_path, blend=[2.0, str(tmp_path / "a"), 1.0, str(tmp_path / "b")])
    cfg.train.steps, cfg.logger.kind = 2, "none"
    assert len(pretrain(cfg, str(tmp_path / "run")).records) == 2  # the training loop reads the source
    with pytest.raises(ValueError, match="cannot read the indexed dataset"):
        indexed_rows(_cfg(tmp_path, path=str(tmp_path / "missing")), str(tmp_path))


def test_preprocess_tokenizes_reports_skipped_records_and_packs(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "The quick brown fox."}) + "\n{broken\n"
                                      + json.dumps({"body": "no text key"}) + "\n" + json.dumps({"text": "Jumps."}) + "\n")
    (tmp_path / "b.txt").write_text("First paragraph here.\n\nSecond one.\n")
    summary = preprocess([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], str(tmp_path / "out"), None, 300,
                         pack=16, progress=False)
    assert summary["documents"] == 4 and summary["skipped"] == 2
    assert [s.split(": ")[0] for s in summary["skipped_records"]] == [f"{tmp_path / 'a.jsonl'}:2", f"{tmp_path / 'a.jsonl'}:3"]
    docs = read_indexed(str(tmp_path / "out"))
    assert len(docs) == 4 and all(d[-1] == 0 for d in docs)  # EOS closes every document
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "out.tokenizer.json"))
    assert tok.decode(docs[0][:-1]) == "The quick brown fox."
    from safetensors.torch import load_file

    packed = load_file(str(tmp_path / "out.packed.safetensors"))
    assert packed["input_ids"].shape[1] == 16 and summary["packed_rows"] == packed["input_ids"].shape[0]
    main([str(tmp_path / "b.txt"), "--out", str(tmp_path / "cli"), "--tokenizer", str(tmp_path / "out.tokenizer.json")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents"] == 2
