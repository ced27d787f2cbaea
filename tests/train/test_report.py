"""Monitoring: MFU formula, per-layer MoE health, report images, wandb heatmap.
Run: `python -m pytest tests/train/test_report.py`."""
from __future__ import annotations

import glob
import json
import os

import pytest
from PIL import Image

from scimoe.config import ModelConfig
from scimoe.model.counting import matmul_parameters_per_token, training_flops_per_token
from scimoe.report import main, report
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config


def test_training_flops_of_the_tiny_model_match_a_hand_count():
    cfg = ModelConfig()  # H 128, 4 layers, 8 q / 2 kv heads of 16, 16 experts of 64, top-4, vocab 384
    attention = 4 * (128 * 128 + 2 * 128 * 32 + 128 * 128)  # q, k, v, o per layer
    experts = 4 * (4 * 3 * 128 * 64 + 16 * 128)  # K=4 SwiGLU experts + the router per layer
    head = 384 * 128
    assert matmul_parameters_per_token(cfg) == attention + experts + head == 614_400
    # 6 FLOPs per weight, plus causal attention: 6 · layers · heads · head_dim · S
    assert training_flops_per_token(cfg, 64) == 6 * 614_400 + 6 * 4 * 8 * 16 * 64 == 3_883_008


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = tiny_config(steps=4)
    cfg.model.moe.bias_update_rate = 1e-2
    cfg.cluster.gpu, cfg.cluster.peak_tflops = "cpu", 0.5
    pretrain(cfg, str(tmp))
    return str(tmp), cfg


def test_metrics_have_mfu_memory_data_share_and_moe_health_per_layer(run):
    run_dir, cfg = run
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for r in records:
        # the hand count above at seq 64: 3,883,008 FLOPs per token, over the 0.5 TFLOP/s given as the peak
        assert cfg.train.seq_len == 64
        expected_mfu = 3_883_008 * r["tokens_per_s"] / 0.5e12
        assert r["mfu"] == pytest.approx(expected_mfu, rel=0.02)
        assert 0.01 < r["memory_gib"] < 24 and 0 <= r["data_time_share"] < 1
        assert r["tokens_by_modality"] == {"text": r["tokens"], "image": 0, "time_series": 0}
        moe = r["moe"]
        assert len(moe["tokens_per_expert"]) == cfg.model.layers
        for layer in moe["tokens_per_expert"]:  # every token goes to exactly top_k experts
            assert len(layer) == 16 and sum(layer) == r["tokens"] * cfg.model.moe.top_k
        assert moe["dead_experts"] == [sum(c == 0 for c in layer) for layer in moe["tokens_per_expert"]]
        assert sum(moe["balance_loss"]) == pytest.approx(r["balance_loss"], rel=1e-6)
    assert records[0]["moe"]["bias_abs_max"] == [0.0] * 4 and max(records[-1]["moe"]["bias_abs_max"]) > 0


def test_report_writes_the_plots(run, tmp_path, capsys):
    run_dir, _ = run
    paths = report(run_dir, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["expert_load.png", "expert_load_last.png", "loss.png",
                                                         "moe_health.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size[0] > 300 and image.size[1] > 150
            assert sum(1 for n in image.convert("L").histogram() if n) > 10  # something was drawn
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_wandb_offline_run_gets_the_metrics_and_the_load_heatmap(tmp_path):
    cfg = tiny_config(steps=2)
    cfg.logger.kind, cfg.logger.heatmap_every = "wandb", 1
    pretrain(cfg, str(tmp_path))
    images = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "moe" / "*.png"))
    assert len(images) == 2, os.listdir(tmp_path / "wandb")
    history = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert history and os.path.getsize(history[0]) > 0
