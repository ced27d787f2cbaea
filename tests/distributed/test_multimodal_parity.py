"""tiny_mm (vision and time-series encoders) in tp2, pp2, dp2 and cp2 (images and series cut between context
chunks) reproduces one process: the same per-step
losses and grad norms from the same initial weights on the multimodal fixture.
Run: `python -m pytest tests/distributed/test_multimodal_parity.py`."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file

from scimoe.model import build_model
from scimoe.train.pretrain import pretrain
from tests.data.mm_fixture import write_fixture
from tests.distributed.test_parity import TOL, launch
from tests.distributed.worker import mm_config

pytestmark = pytest.mark.distributed


def test_encoders_train_identically_in_tensor_pipeline_and_data_parallel_layouts(tmp_path):
    fixture = write_fixture(str(tmp_path / "data"), repeats=2)
    cfg = mm_config(fixture, micro_batch=2)
    initial = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    save_file({k: v.contiguous() for k, v in initial.items()}, str(tmp_path / "initial.safetensors"))
    reference = pretrain(cfg, str(tmp_path / "single"), initial_state=initial).records
    layouts = [{"name": "tp2", "tp": 2, "micro_batch": 2}, {"name": "pp2", "pp": 2, "micro_batch": 2},
               {"name": "dp2", "micro_batch": 1}, {"name": "cp2", "cp": 2, "micro_batch": 2}]
    out = launch(2, {"mm_parity": {"fixture": fixture, "initial_weights": str(tmp_path / "initial.safetensors"),
                                   "workdir": str(tmp_path), "layouts": layouts}}, tmp_path)["mm_parity"]
    assert reference[0]["tokens_by_modality"]["image"] > 0 and reference[0]["tokens_by_modality"]["time_series"] > 0
    for name, run in out.items():
        assert run["tokens"] == [r["tokens_by_modality"] for r in reference], name
        for got, want in zip(run["losses"], [r["loss"] for r in reference]):
            assert abs(got - want) / want < TOL, (name, run["losses"])
        for got, want in zip(run["grad_norms"], [r["grad_norm"] for r in reference]):
            assert abs(got - want) / want < TOL, (name, run["grad_norms"])
