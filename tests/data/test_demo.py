"""The bundled multimodal demo set: real images and series, the same everywhere, and `model=tiny_mm` trains on it
out of the box. Run: `python -m pytest tests/data/test_demo.py`."""
from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import statsmodels.api as sm

from scimoe.config import compose_config
from scimoe.data.demo import write_demo_set
from scimoe.data.multimodal import read_samples
from scimoe.train.pretrain import pretrain


def test_the_demo_set_is_real_media_and_the_same_on_every_call(tmp_path):
    a, b = write_demo_set(str(tmp_path / "a")), write_demo_set(str(tmp_path / "b"))
    assert filecmp.cmp(a, b, shallow=False)
    for name in os.listdir(tmp_path / "a"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    bad: list[str] = []
    samples = read_samples(a, bad)
    assert not bad and len(samples) >= 50
    kinds = [{kind for kind, _ in s.parts} for s in samples]
    assert sum("image" in k for k in kinds) >= 18 and sum("time_series" in k for k in kinds) >= 30
    assert any({"image", "time_series"} <= k for k in kinds)  # interleaved records too
    # The series are the measurements themselves: the first sunspot window is statsmodels' data.
    records = [json.loads(line) for line in open(a)]
    first = next(r for r in records if r["segments"][0]["text"].startswith("Here are yearly sunspot numbers from 1700 "))
    values = np.load(tmp_path / "a" / first["segments"][1]["path"])[:, 0]
    sun = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    assert np.array_equal(values, sun[: len(values)].astype(np.float32))
    assert f"{sun[: len(values)].max():.1f}" in first["segments"][2]["text"]  # the caption states its facts
    assert write_demo_set(str(tmp_path / "a")) == a  # a second call keeps what is there


def test_tiny_mm_trains_on_images_and_series_from_the_first_step(tmp_path):
    cfg = compose_config(["model=tiny_mm", "train.steps=2", "train.global_batch=4", "train.micro_batch=2",
                          "logger=jsonl"])
    assert cfg.data.source == "multimodal_demo"  # model=tiny_mm's own default data
    pretrain(cfg, str(tmp_path / "run"))
    first = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["tokens_by_modality"]
    assert first["image"] > 0 and first["time_series"] > 0 and first["text"] > 0
    assert os.path.exists(tmp_path / "run" / "demo_data" / "demo.jsonl")
