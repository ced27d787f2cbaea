"""Generation and GRPO in every layout training supports give what one process gives:
`python -m pytest tests/distributed/test_generation.py`.

Greedy and seeded sampling: the same tokens, log-probs within 1e-5, the same experts recorded per layer, the
same scored log-probs (fp32). GRPO for three steps: layouts with one data-parallel replica match one process;
those with two match expert parallelism on two ranks (the same prompts and generators per replica).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from scimoe.model import build_model
from scimoe.parallel.dims import ParallelDims
from tests.distributed import launching
from tests.distributed.generation_worker import MODES, generate, generation_config, run_grpo

WORKER = os.path.join(os.path.dirname(__file__), "generation_worker.py")
pytestmark = pytest.mark.distributed


def launch(nproc: int, spec: dict, tmp) -> dict:
    return launching.launch(WORKER, nproc, spec, tmp)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation")
    cfg = generation_config({})
    model = build_model(cfg.model, seed=cfg.train.seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "initial.safetensors"))
    reference = {mode: generate(model, ParallelDims(), [], mode) for mode in MODES}
    grpo = run_grpo({"workdir": str(tmp), "layouts": [{"name": "single"}, {"name": "single_3_layers", "layers": 3}]},
                    0, 1)
    return {"tmp": tmp, "generate": reference, "grpo": grpo["single"], "grpo_3_layers": grpo["single_3_layers"],
            "initial": str(tmp / "initial.safetensors")}


def _assert_same_generation(got: dict, want: dict, name: str) -> None:
    for mode in MODES:
        g, w = got[mode], want[mode]
        assert g["tokens"] == w["tokens"], (name, mode)
        assert torch.allclose(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-5), (name, mode)
        assert g["experts"] == w["experts"], (name, mode)  # router replay recorded alike in every layout
        assert torch.allclose(torch.tensor(g["scored"]), torch.tensor(w["scored"]), atol=1e-5), (name, mode)


def _assert_same_grpo(got: list[dict], want: list[dict], name: str) -> None:
    assert len(got) == len(want) == 3, name
    for g, w in zip(got, want):
        assert g["reward_mean"] == w["reward_mean"] and g["response_length"] == w["response_length"], (name, g, w)
        for key in ("loss", "grad_norm", "kl"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (name, key, g, w)


TWO_RANK_LAYOUTS = [{"name": "tp2", "tp": 2}, {"name": "pp2", "pp": 2}, {"name": "pp2_uneven", "pp": 2, "pp_layers": [1, 3]},
                    {"name": "ep2", "ep": 2}, {"name": "tp2_sp", "tp": 2, "sequence_parallel": True},
                    {"name": "tp2_etp2", "tp": 2, "etp": 2}]
# recipe=grpo's model has 2 layers: its uneven split runs a 3-layer variant, against one process's run of it
TWO_RANK_GRPO = [l for l in TWO_RANK_LAYOUTS if l["name"] != "pp2_uneven"] + \
    [{"name": "pp2_uneven", "pp": 2, "pp_layers": [1, 2], "layers": 3}]


@pytest.fixture(scope="module")
def two_ranks(single, tmp_path_factory):
    """One two-rank launch: generation and GRPO in every two-rank layout (its ep2 GRPO run is the reference of
    two data-parallel replicas for the four-rank layouts)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    return launch(2, {"generate": {"initial_weights": single["initial"], "layouts": TWO_RANK_LAYOUTS},
                      "grpo": {"workdir": str(tmp), "layouts": TWO_RANK_GRPO}}, tmp)


def test_two_rank_layouts_generate_and_train_grpo_like_one_process(single, two_ranks):
    for layout in TWO_RANK_LAYOUTS:
        _assert_same_generation(two_ranks["generate"][layout["name"]], single["generate"], layout["name"])
    for name in ("tp2", "pp2", "tp2_sp", "tp2_etp2"):  # one data-parallel replica: one process's run
        _assert_same_grpo(two_ranks["grpo"][name], single["grpo"], name)
    _assert_same_grpo(two_ranks["grpo"]["pp2_uneven"], single["grpo_3_layers"], "pp2_uneven")


def test_four_rank_layouts_generate_and_train_grpo_like_their_references(single, two_ranks, tmp_path):
    layouts = [{"name": "tp2_ep2", "tp": 2, "ep": 2}, {"name": "pp2_ep2", "pp": 2, "ep": 2},
               {"name": "tp2_pp2", "tp": 2, "pp": 2}, {"name": "tp2_ep2_etp2", "tp": 2, "ep": 2, "etp": 2}]
    out = launch(4, {"generate": {"initial_weights": single["initial"], "layouts": layouts},
                     "grpo": {"workdir": str(tmp_path), "layouts": layouts}}, tmp_path)
    for layout in layouts:
        _assert_same_generation(out["generate"][layout["name"]], single["generate"], layout["name"])
    _assert_same_grpo(out["grpo"]["tp2_pp2"], single["grpo"], "tp2_pp2")
    for name in ("tp2_ep2", "pp2_ep2", "tp2_ep2_etp2"):  # two replicas: the two-rank ep2 run's
        _assert_same_grpo(out["grpo"][name], two_ranks["grpo"]["ep2"], name)
