"""Activation recomputation changes no bit: in 4-rank layouts with tp, ep, etp, sequence parallelism and an
interleaved pipeline, train.recompute=selective and full give the `none` run's losses, gradient norms and final
weights exactly (fp32, gloo). Run: `python -m pytest tests/distributed/test_recompute_parity.py`."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from scimoe.model import build_model
from tests.distributed.parity_config import GLOBAL_BATCH, parity_config
from tests.distributed.test_parity import launch

pytestmark = pytest.mark.distributed


def test_recompute_is_bitwise_neutral_in_four_rank_layouts(tmp_path):
    cfg = parity_config(micro_batch=GLOBAL_BATCH)
    initial = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    save_file({k: v.contiguous() for k, v in initial.items()}, str(tmp_path / "initial.safetensors"))
    layouts = [{"name": "tp2xep2_sp_etp2", "tp": 2, "ep": 2, "etp": 2, "sp": True, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "tp2xpp2_interleaved_sp", "tp": 2, "pp": 2, "pp_virtual": 2, "sp": True,
                "micro_batch": GLOBAL_BATCH // 2},
               {"name": "pp2xep2", "pp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 4}]
    out = launch(4, {"recompute": {"initial_weights": str(tmp_path / "initial.safetensors"), "steps": 3,
                                   "workdir": str(tmp_path), "layouts": layouts}}, tmp_path)["recompute"]
    assert sorted(out) == sorted(layout["name"] for layout in layouts)
    for name, runs in out.items():
        none = runs["none"]
        assert len(none["losses"]) == 3 and all(torch.isfinite(torch.tensor(none["losses"])))
        # rank 0 really recomputed: per step and micro-batch, each of its layers once (full) or its attention
        # cores and expert blocks (selective)
        assert none["regions"] == 0 and runs["full"]["regions"] > 0, (name, runs)
        assert runs["selective"]["regions"] > runs["full"]["regions"], (name, runs)
        for mode in ("selective", "full"):
            assert runs[mode]["losses"] == none["losses"], (name, mode)
            assert runs[mode]["grad_norms"] == none["grad_norms"], (name, mode)
            assert runs[mode]["weights_equal"], (name, mode)
