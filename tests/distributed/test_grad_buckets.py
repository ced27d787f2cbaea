"""Data-parallel gradients summed in buckets during the backward: the same bits as summing after it, in layouts
with gradient accumulation, expert-dp and a pipeline (many small buckets); one large bucket agrees to rounding. Run:
`python -m pytest tests/distributed/test_grad_buckets.py`."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file

from scimoe.model import build_model
from tests.distributed.parity_config import GLOBAL_BATCH, parity_config
from tests.distributed.test_parity import launch

pytestmark = pytest.mark.distributed
VARIANTS = [{"name": "after_backward", "overlap": False, "bucket_mb": 0.02},
            {"name": "overlapped", "overlap": True, "bucket_mb": 0.02},
            {"name": "overlapped_one_bucket", "overlap": True, "bucket_mb": 1024}]


def test_overlapped_bucketed_reduction_is_bitwise_the_reduction_after_the_backward(tmp_path):
    cfg = parity_config(micro_batch=GLOBAL_BATCH)
    initial = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    save_file({k: v.contiguous() for k, v in initial.items()}, str(tmp_path / "initial.safetensors"))
    layouts = [{"name": "dp4_accumulating", "micro_batch": GLOBAL_BATCH // 8},  # 2 micro-batches a step
               {"name": "ep2xdp2", "ep": 2, "micro_batch": GLOBAL_BATCH // 8},
               {"name": "pp2xdp2", "pp": 2, "micro_batch": GLOBAL_BATCH // 8}]
    out = launch(4, {"buckets": {"initial_weights": str(tmp_path / "initial.safetensors"), "steps": 3,
                                 "workdir": str(tmp_path), "layouts": layouts, "variants": VARIANTS}},
                 tmp_path)["buckets"]
    for name, runs in out.items():
        reference = runs["after_backward"]
        assert len(reference["losses"]) == 3
        assert set(reference["started_early"]) == {0}, (name, reference)  # nothing before the backward ended
        # The same buckets: the same bits whether they start during or after the backward.
        assert runs["overlapped"]["losses"] == reference["losses"], name
        assert runs["overlapped"]["grad_norms"] == reference["grad_norms"], name
        assert runs["overlapped"]["weights_equal"], name
        # Other bucket boundaries change where gloo's ring starts summing an element over 4 ranks: the last bit
        # may differ, nothing more.
        for got, want in zip(runs["overlapped_one_bucket"]["losses"], reference["losses"]):
            assert got == pytest.approx(want, rel=1e-7), name
        assert min(runs["overlapped"]["started_early"]) > 1, (name, runs["overlapped"])  # several, every step
