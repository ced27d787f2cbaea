"""Multimodal data: records, bad input, packing, no leakage, resumable loader.
Run: `python -m pytest tests/data/test_multimodal.py`."""
from __future__ import annotations

import json

import pytest
import torch

from scimoe.config import Config, DataConfig, ModelConfig, TrainConfig
from scimoe.data.loader import StepLoader
from scimoe.data.multimodal import multimodal_rows, read_samples
from scimoe.config import compose_config
from scimoe.model import build_model
from scimoe.model.timeseries import ts_token_count
from scimoe.model.vision import image_token_count
from tests.data.mm_fixture import write_fixture


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_fixture(str(tmp_path_factory.mktemp("mm")), repeats=2)


def _cfg(path: str, seq_len: int = 256, **data) -> Config:
    cfg = compose_config(["model=tiny_mm", "data=multimodal", f"data.path={path}", f"train.seq_len={seq_len}",
                          "train.global_batch=4", "train.micro_batch=2", "data.max_bad_fraction=0.5"])
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_every_bad_record_kind_is_skipped_and_reported_with_its_line(fixture):
    bad: list[str] = []
    docs = read_samples(fixture, bad)
    assert len(docs) == 20
    reasons = [line.split(": ", 2)[1:] for line in bad]
    assert [line.split(":")[1] for line in bad] == ["21", "22", "23", "24", "25", "26"]
    for expected in ("not JSON", "unreadable image", "NaN or Inf", "length × channels", "empty text",
                     "sampling_rate must be a number > 0"):
        assert any(expected in " ".join(r) for r in reasons), expected
    streamed = read_samples(fixture, [], streaming=True)  # the same through streaming
    assert len(streamed) == 20 and torch.equal(streamed[0].images[0], docs[0].images[0])


def test_too_many_bad_records_stop_the_run_by_name(fixture, tmp_path):
    with pytest.raises(ValueError, match="more than data.max_bad_fraction=0.1"):
        multimodal_rows(_cfg(fixture, max_bad_fraction=0.1), str(tmp_path))


def test_placeholders_match_the_encoders_and_carry_no_labels(fixture, tmp_path):
    cfg = _cfg(fixture)
    rows = multimodal_rows(cfg, str(tmp_path))
    model = build_model(cfg.model, seed=0)
    for r in range(len(rows)):
        ids, labels = rows.input_ids[r], rows.labels[r]
        n_image = int((ids == cfg.model.image_token_id).sum())
        n_ts = int((ids == cfg.model.ts_token_id).sum())
        with torch.no_grad():
            assert n_image == sum(len(model.vision(img)) for img in rows.images[r])
            assert n_ts == sum(len(model.timeseries(v, rate)) for v, rate in rows.series[r])
        placeholder = (ids == cfg.model.image_token_id) | (ids == cfg.model.ts_token_id)
        assert bool((labels[:-1][placeholder[1:]] == -100).all())  # nothing is trained to predict a placeholder
        targets = torch.cat([ids[1:], ids[:1]])
        starts = (rows.positions[r] == 0).nonzero().flatten().tolist()
        for s in starts[1:]:
            assert labels[s - 1] == -100  # the last token of a document predicts nothing
        keep = labels != -100
        assert torch.equal(labels[keep], targets[keep])


def test_packed_documents_see_nothing_of_each_other(fixture, tmp_path):
    """A packed row's logits equal each document's logits run alone (attention, positions and media)."""
    cfg = _cfg(fixture)
    cfg.model.zero_init_output = False
    rows = multimodal_rows(cfg, str(tmp_path))
    model = build_model(cfg.model, seed=1).eval()
    r = max(range(len(rows)), key=lambda i: int((rows.positions[i] == 0).sum()))
    ids, pos = rows.input_ids[r:r + 1], rows.positions[r:r + 1]
    with torch.no_grad():
        packed = model(ids, pos, images=rows.images[r], series=rows.series[r]).logits[0]
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    ends = starts[1:] + [int((pos[0] > 0).nonzero().max()) + 1]
    images, series = list(rows.images[r]), list(rows.series[r])

    def take(items: list, tokens: int, count) -> list:  # the media whose placeholders fill `tokens`
        taken = []
        while tokens > 0:
            taken.append(items.pop(0))
            tokens -= count(taken[-1])
        return taken

    checked = 0
    for s, e in zip(starts, ends):
        doc = ids[:, s:e]
        mine_img = take(images, int((doc == cfg.model.image_token_id).sum()), lambda im: image_token_count(*im.shape[1:]))
        mine_ts = take(series, int((doc == cfg.model.ts_token_id).sum()), lambda x: ts_token_count(len(x[0]), x[1]))
        with torch.no_grad():
            alone = model(doc, pos[:, s:e], images=mine_img, series=mine_ts).logits[0]
        assert torch.allclose(packed[s:e], alone, atol=1e-5), (s, e, float((packed[s:e] - alone).abs().max()))
        checked += 1
    assert checked >= 2


def test_each_ranks_batches_after_resume_equal_the_uninterrupted_ones(fixture, tmp_path):
    cfg = _cfg(fixture, seq_len=128)
    rows = multimodal_rows(cfg, str(tmp_path))
    for rank in (0, 1):
        whole = StepLoader(rows, 4, 1, seed=7, dp_rank=rank, dp_size=2)
        steps = [whole.next_step() for _ in range(8)]
        first = StepLoader(rows, 4, 1, seed=7, dp_rank=rank, dp_size=2)
        for _ in range(3):
            first.next_step()
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would carry it
        resumed = StepLoader(rows, 4, 1, seed=7, dp_rank=rank, dp_size=2)
        resumed.load_state_dict(state)
        for want in steps[3:]:
            got = resumed.next_step()
            for a, b in zip(got, want):
                assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
                assert len(a["images"]) == len(b["images"]) and all(torch.equal(x, y) for x, y in zip(a["images"], b["images"]))
                assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a["series"], b["series"]))


def test_parquet_records_read_like_jsonl(fixture, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.loads(line) for line in open(fixture) if line.strip().startswith('{"segments"')][:6]
    for record in lines:  # parquet holds paths relative to itself: point them at the fixture folder
        for seg in record["segments"]:
            if "path" in seg:
                seg["path"] = str(__import__("pathlib").Path(fixture).parent / seg["path"])
    pq.write_table(pa.table({"segments": [json.dumps(r["segments"]) for r in lines]}), str(tmp_path / "s.parquet"))
    bad: list[str] = []
    docs = read_samples(str(tmp_path / "s.parquet"), bad)
    want = read_samples(fixture, [])[:6]
    assert bad == [] and len(docs) == 6
    assert [k for k, _ in docs[0].parts] == [k for k, _ in want[0].parts]
    assert all(torch.equal(a, b) for a, b in zip(docs[0].images, want[0].images))


def test_frozen_encoders_do_not_train(fixture, tmp_path):
    from scimoe.train.pretrain import pretrain

    cfg = _cfg(fixture)
    cfg.model.vision.freeze = cfg.model.timeseries.freeze = True
    cfg.model.zero_init_output = False
    cfg.train.steps, cfg.logger.kind = 2, "none"
    run = pretrain(cfg, str(tmp_path), gather_final_weights=True)
    fresh = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    for name, value in run.final_weights.items():
        if name.startswith(("vision.", "timeseries.")):
            assert torch.equal(value, fresh[name]), name
    assert not torch.equal(run.final_weights["lm_head.weight"], fresh["lm_head.weight"])


def test_a_long_trended_series_is_standardised_whole_then_cut_as_the_release_does():
    """LMDeploy standardises over the whole series and then keeps the first 240,000 samples: with a trend, cutting
    first would give other values (up to 0.75 apart on this series)."""
    import numpy as np

    from scimoe.config import TimeSeriesModelConfig
    from scimoe.data.multimodal import load_series

    t = np.arange(300_000, dtype=np.float64)
    values = np.stack([t / 1000.0 + np.sin(t / 50.0), np.cos(t / 7.0) - t / 5000.0], axis=1)
    series, rate = load_series({"values": values.tolist(), "sampling_rate": 100.0}, ".", TimeSeriesModelConfig())
    whole = (values.astype(np.float32) - values.astype(np.float32).mean(0)) / (values.astype(np.float32).std(0) + 1e-8)
    assert series.shape == (240_000, 2) and rate == 100.0
    assert np.abs(series.numpy() - whole[:240_000]).max() < 1e-5
    cut_first = values[:240_000].astype(np.float32)
    cut_first = (cut_first - cut_first.mean(0)) / (cut_first.std(0) + 1e-8)
    assert np.abs(series.numpy() - cut_first).max() > 0.5  # the two orders really differ here
