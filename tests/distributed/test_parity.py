"""Every layout reproduces the single-process run, and checkpoints resume exactly into the same layout
and into other ones (gloo, CPU): `python -m pytest tests/distributed -m distributed`.

The reference runs in this process; each world size is one torchrun launch running all its layouts
(tests/distributed/worker.py), from the same saved initial weights, on the same global batches. Some
layouts save at step RESUME_AT; layouts named `*_from_X` resume X's checkpoint in another layout (and
world size, for the single-process resumes run here), `*_resumed` resume their own layout. A resumed run
must log the reference's losses (bit-identical to its source when the layout is the same) and end with
the reference's weights and AdamW moments: losing the optimizer state on a layout change shows there.
"""
from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import save_file

from scimoe.model import build_model
from scimoe.checkpoint import contents, storage
from scimoe.train.master import cpu_adam_available
from scimoe.train.pretrain import pretrain
from scimoe.checkpoint.shards import ShardIndex
from tests.distributed import launching
from tests.distributed.parity_config import GLOBAL_BATCH, STEPS, parity_config
from tests.plan.test_memory_plan import assert_memory_matches

WORKER = os.path.join(os.path.dirname(__file__), "worker.py")
LOSS_TOL = 1e-6
"""Relative loss difference allowed at every step (measured on 2026-12-08: at most 1.3e-7 over all layouts)."""
TOL = 1e-5
"""Relative grad-norm and final-weight difference allowed (measured: at most 1.8e-6 and 2.8e-6)."""
RESUME_AT = 5

pytestmark = pytest.mark.distributed


def launch(nproc: int, spec: dict, tmp) -> dict:
    return launching.launch(WORKER, nproc, spec, tmp)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    cfg = parity_config(micro_batch=GLOBAL_BATCH // 2)
    initial = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    save_file({k: v.contiguous() for k, v in initial.items()}, str(tmp / "initial.safetensors"))
    run = pretrain(cfg, str(tmp / "single"), initial_state=initial, gather_final_weights=True)
    assert len(run.records) == STEPS
    (tmp / "reference.json").write_text(json.dumps({"losses": [r["loss"] for r in run.records],
                                                    "expert_counts": [r["moe"]["tokens_per_expert"] for r in run.records],
                                                    "layer_balance": [r["moe"]["balance_loss"] for r in run.records],
                                                    "grad_norms": [r["grad_norm"] for r in run.records],
                                                    "optimizer_state_numel": run.optimizer_state_numel,
                                                    "micro_batch": cfg.train.micro_batch}))
    save_file({k: v.contiguous() for k, v in run.final_weights.items()}, str(tmp / "final.safetensors"))
    assert any(r["grad_norm"] > cfg.train.grad_clip for r in run.records), "clipping should be exercised"
    return {"reference": str(tmp / "reference.json"), "initial_weights": str(tmp / "initial.safetensors"),
            "losses": [r["loss"] for r in run.records],
            "expert_counts": [r["moe"]["tokens_per_expert"] for r in run.records],
            "layer_balance": [r["moe"]["balance_loss"] for r in run.records],
            "final_weights": str(tmp / "final.safetensors"), "workdir": str(tmp)}


def _assert_parity(results: dict, names: list[str], reference: dict) -> None:
    """Losses, grad norms and weights match; the logged MoE metrics, aggregated over the layout's
    ranks, are the single process's: the same tokens per expert in every layer, the same per-layer
    balance loss."""
    assert sorted(results) == sorted(names)
    for name, r in results.items():  # `pytest -s` shows the measured margins
        print(f"parity {name}: loss {r['loss_rel']:.1e}, grad norm {r['grad_norm_rel']:.1e}, weights "
              f"{r['weight_rel']:.1e} (relative, worst of {STEPS} steps)")
        assert r["steps"] == STEPS, name
        assert r["loss_rel"] < LOSS_TOL, (name, r)
        assert r["grad_norm_rel"] < TOL, (name, r)
        assert r["weight_rel"] < TOL, (name, r)
        first = STEPS - len(r["expert_counts"])
        assert r["expert_counts"] == reference["expert_counts"][first:], name
        for got, want in zip(r["layer_balance"], reference["layer_balance"][first:]):
            assert got == pytest.approx(want, rel=TOL, abs=1e-12), name


def final_checkpoint(workdir: str, name: str) -> str:
    return storage.step_dir(os.path.join(workdir, name), STEPS)


def checkpoint_deviation(path: str, reference_path: str) -> dict[str, float]:
    """‖a − b‖/‖b‖ of every model and optimizer tensor, each assembled whole from its layout's pieces."""
    out = {}
    for kind in ("model", "optimizer"):
        got, want = ShardIndex(contents.files(path, kind)), ShardIndex(contents.files(reference_path, kind))
        assert got.names() == want.names(), (kind, set(got.names()) ^ set(want.names()))
        for name in want.names():
            a, b = got.full(name).double(), want.full(name).double()
            out[f"{kind}:{name}"] = float((a - b).norm() / (b.norm() + 1e-12))
    return out


def _assert_resumed(results: dict, reference: dict, name: str, source: str | None = None) -> None:
    """`name` resumed at RESUME_AT: same losses as the reference (bitwise as `source` if given), same
    final weights and optimizer moments."""
    r = results[name]
    assert len(r["losses"]) == STEPS - RESUME_AT, r
    if source:
        assert r["losses"] == results[source]["losses"][RESUME_AT:], (name, r["losses"])
    deviation = checkpoint_deviation(final_checkpoint(reference["workdir"], name),
                                     final_checkpoint(reference["workdir"], "single"))
    worst = max(deviation, key=deviation.get)
    assert deviation[worst] < 1e-4, (name, worst, deviation[worst])


def _resume_in_this_process(reference: dict, source: str) -> None:
    """Resume `source`'s multi-rank checkpoint in one process: the world size changes too."""
    cfg = parity_config(micro_batch=GLOBAL_BATCH // 2)
    cfg.checkpoint.resume = storage.step_dir(os.path.join(reference["workdir"], source), RESUME_AT)
    name = f"single_from_{source}"
    run = pretrain(cfg, os.path.join(reference["workdir"], name))
    losses = [r["loss"] for r in run.records]
    assert len(losses) == STEPS - RESUME_AT
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"][RESUME_AT:])) < LOSS_TOL, losses
    _assert_resumed({name: {"losses": losses}}, reference, name)


def test_two_rank_layouts_match_single_process_and_dispatch_edge_cases(reference, tmp_path):
    layouts = [{"name": "ep2", "ep": 2, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "dp2", "ep": 1, "micro_batch": GLOBAL_BATCH // 4, "save_every": RESUME_AT},
               {"name": "tp2", "tp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2, "save_every": RESUME_AT},
               {"name": "dp2_zero0", "ep": 1, "zero": 0, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "pp2", "pp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2, "save_every": RESUME_AT},
               {"name": "pp2_interleaved", "pp": 2, "pp_virtual": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "pp2_uneven", "pp": 2, "pp_layers": [1, 3], "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "tp2_sp", "tp": 2, "sp": True, "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "dp2_from_tp2", "ep": 1, "micro_batch": GLOBAL_BATCH // 4, "resume_from": "tp2",
                "resume_step": RESUME_AT},
               {"name": "tp2_etp2", "tp": 2, "etp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2, "save_every": RESUME_AT},
               {"name": "dp2_from_tp2_etp2", "ep": 1, "micro_batch": GLOBAL_BATCH // 4, "resume_from": "tp2_etp2",
                "resume_step": RESUME_AT},
               {"name": "tp2_sp_etp2", "tp": 2, "sp": True, "etp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "ep2_from_pp2", "ep": 2, "micro_batch": GLOBAL_BATCH // 4, "resume_from": "pp2",
                "resume_step": RESUME_AT},
               {"name": "cp2", "cp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2, "save_every": RESUME_AT},
               {"name": "dp2_from_cp2", "ep": 1, "micro_batch": GLOBAL_BATCH // 4, "resume_from": "cp2",
                "resume_step": RESUME_AT},
               {"name": "cp2_from_dp2", "cp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2, "resume_from": "dp2",
                "resume_step": RESUME_AT}]
    memory = [{"name": "mem_dp2"}, {"name": "mem_ep2", "ep": 2}, {"name": "mem_tp2", "tp": 2},
              {"name": "mem_pp2", "pp": 2}, {"name": "mem_tp2_sp", "tp": 2, "sp": True},
              {"name": "mem_tp2_etp2", "tp": 2, "etp": 2}, {"name": "mem_tp2_sp_etp2", "tp": 2, "etp": 2, "sp": True},
              {"name": "mem_ep2_bf16", "ep": 2, "dtype": "bf16"},
              {"name": "mem_tp2_sp_bf16_selective", "tp": 2, "sp": True, "dtype": "bf16", "recompute": "selective"},
              {"name": "mem_pp2_bf16_full", "pp": 2, "dtype": "bf16", "recompute": "full"},
              {"name": "mem_cp2", "cp": 2}, {"name": "mem_cp2_bf16_selective", "cp": 2, "dtype": "bf16",
                                              "recompute": "selective"}]
    out = launch(2, {"parity": dict(reference, layouts=layouts), "dispatch": True, "grad_norm": True,
                     "memory": {"workdir": str(tmp_path), "layouts": memory}}, tmp_path)
    for name, ranks in out["memory"].items():  # the capacity planner against what these ranks allocated
        assert_memory_matches(name, ranks)
    _assert_parity(out["parity"], ["ep2", "dp2", "tp2", "dp2_zero0", "pp2", "pp2_interleaved", "pp2_uneven", "tp2_sp",
                                   "dp2_from_tp2", "ep2_from_pp2", "tp2_etp2", "dp2_from_tp2_etp2", "tp2_sp_etp2",
                                   "cp2", "dp2_from_cp2", "cp2_from_dp2"],
                   reference)
    _assert_resumed(out["parity"], reference, "dp2_from_tp2")  # tp2 → tp1
    _assert_resumed(out["parity"], reference, "ep2_from_pp2")  # pp2 → pp1 (and ep1 → ep2)
    _assert_resumed(out["parity"], reference, "dp2_from_tp2_etp2")  # experts split over etp → whole again
    _resume_in_this_process(reference, "dp2")  # dp2 → dp1, two ranks → one
    _assert_resumed(out["parity"], reference, "dp2_from_cp2")  # cp2 → cp1: rows whole again, read by two replicas
    _assert_resumed(out["parity"], reference, "cp2_from_dp2")  # cp1 → cp2
    _resume_in_this_process(reference, "cp2")  # cp2 → one process
    # ZeRO-1 (the default) holds about half the AdamW state per rank at dp2; zero=0 holds all of it.
    assert 0.3 < out["parity"]["dp2"]["optimizer_state_share"] < 0.7
    assert out["parity"]["dp2_zero0"]["optimizer_state_share"] == 1.0
    assert out["parity"]["tp2"]["optimizer_state_share"] < 1.0  # attention/vocab shards
    for rank, cases in out["dispatch"].items():
        for case, r in cases.items():
            assert r["y"] < 1e-5 and r["x_grad"] < 1e-5 and r["expert_grad"] < 1e-5, (rank, case, r)
    assert out["dispatch"]["rank1"]["all_on_rank0"]["received"] == 0  # a rank with zero tokens
    for cases in out["dispatch"].values():  # G == ep: every token sends K/G = 1 copy to each ep rank
        assert cases["balanced"]["send_splits"] == [cases["balanced"]["tokens"]] * 2
    assert out["dispatch"]["rank0"]["all_on_rank0"]["received"] == 2 * (3 + 5)  # every copy from both ranks
    gn = out["grad_norm"]
    assert gn["norm"] == pytest.approx(gn["expected"], rel=1e-9)
    assert gn["norm_after_clip"] == pytest.approx(1.0, rel=1e-5)
    assert gn["deepspeed"] == dict.fromkeys(gn["deepspeed"], True)  # DeepSpeed sees megatron's groups


def test_four_rank_layouts_match_single_process(reference, tmp_path):
    layouts = [{"name": "ep4", "ep": 4, "micro_batch": GLOBAL_BATCH // 8, "save_every": RESUME_AT},
               {"name": "ep2xdp2", "ep": 2, "micro_batch": GLOBAL_BATCH // 8, "save_every": RESUME_AT},
               {"name": "dp4", "ep": 1, "micro_batch": GLOBAL_BATCH // 8},
               {"name": "tp2xdp2", "tp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "pp2xdp2", "pp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "pp2xep2", "pp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "tp2xpp2", "tp": 2, "pp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "tp2xep2", "tp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 4, "save_every": RESUME_AT},
               {"name": "tp2xep2_sp", "tp": 2, "ep": 2, "sp": True, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "ep4_from_ep2xdp2", "ep": 4, "micro_batch": GLOBAL_BATCH // 8, "resume_from": "ep2xdp2",
                "resume_step": RESUME_AT},
               {"name": "dp4_from_ep4", "ep": 1, "micro_batch": GLOBAL_BATCH // 8, "resume_from": "ep4",
                "resume_step": RESUME_AT},
               {"name": "tp2xep2_resumed", "tp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 4,
                "resume_from": "tp2xep2", "resume_step": RESUME_AT},
               {"name": "tp2xep2_etp2", "tp": 2, "ep": 2, "etp": 2, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "tp2xpp2_sp", "tp": 2, "pp": 2, "sp": True, "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "tp2xep2_sp_etp2", "tp": 2, "ep": 2, "sp": True, "etp": 2, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "cp2xtp2", "cp": 2, "tp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "cp2xtp2_sp", "cp": 2, "tp": 2, "sp": True, "ep": 1, "micro_batch": GLOBAL_BATCH // 2},
               {"name": "cp2xep2", "cp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "cp2xpp2", "cp": 2, "pp": 2, "ep": 1, "micro_batch": GLOBAL_BATCH // 2}]
    memory = [{"name": "mem_ep2xdp2", "ep": 2}, {"name": "mem_tp2xep2", "tp": 2, "ep": 2},
              {"name": "mem_tp2xep2_etp2", "tp": 2, "ep": 2, "etp": 2},
              {"name": "mem_pp2xdp2_zero0", "pp": 2, "zero": 0},
              *([{"name": "mem_tp2xep2_bf16_offload", "tp": 2, "ep": 2, "dtype": "bf16", "offload": "cpu"}]
                if cpu_adam_available() else []),  # DeepSpeed's cpu_adam op (tests/train/test_master.py says why not)
              {"name": "mem_ep2xdp2_bf16_grad16", "ep": 2, "dtype": "bf16", "grad_reduce": "bf16"},
              {"name": "mem_cp2xtp2_sp", "cp": 2, "tp": 2, "sp": True}, {"name": "mem_cp2xep2", "cp": 2, "ep": 2}]
    out = launch(4, {"parity": dict(reference, layouts=layouts), "dispatch": True,
                     "memory": {"workdir": str(tmp_path), "layouts": memory}}, tmp_path)
    for name, ranks in out["memory"].items():
        assert_memory_matches(name, ranks)
    _assert_parity(out["parity"], ["ep4", "ep2xdp2", "dp4", "tp2xdp2", "pp2xdp2", "pp2xep2", "tp2xpp2", "tp2xep2",
                                   "tp2xep2_sp", "ep4_from_ep2xdp2", "dp4_from_ep4", "tp2xep2_resumed", "tp2xep2_etp2",
                                   "tp2xpp2_sp", "tp2xep2_sp_etp2", "cp2xtp2", "cp2xtp2_sp", "cp2xep2", "cp2xpp2"],
                   reference)
    _assert_resumed(out["parity"], reference, "ep4_from_ep2xdp2")  # ep2 → ep4 (dp2 → dp1)
    _assert_resumed(out["parity"], reference, "dp4_from_ep4")  # ep4 → ep1
    _assert_resumed(out["parity"], reference, "tp2xep2_resumed", source="tp2xep2")  # 2-D, same layout: bitwise
    _resume_in_this_process(reference, "ep4")  # ep4 → one process
    assert 0.15 < out["parity"]["dp4"]["optimizer_state_share"] < 0.35
    for rank in ("rank1", "rank2", "rank3"):
        assert out["dispatch"][rank]["all_on_rank0"]["received"] == 0
    for cases in out["dispatch"].values():  # G = 2 groups over ep = 4: K/G = 1 copy per group, 2 ranks a group
        splits = cases["balanced"]["send_splits"]
        assert splits[0] + splits[1] == splits[2] + splits[3] == cases["balanced"]["tokens"]


def test_eight_rank_three_dimensional_layouts_match_single_process(reference, tmp_path):
    layouts = [{"name": "pp2xep2xdp2", "pp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 8,  # dp 4
                "save_every": RESUME_AT},
               {"name": "tp2xpp2xep2", "tp": 2, "pp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 4},  # dp 2
               {"name": "pp2xep2xdp2_resumed", "pp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 8,
                "resume_from": "pp2xep2xdp2", "resume_step": RESUME_AT},
               {"name": "tp2xpp2xep2_from_pp2xep2xdp2", "tp": 2, "pp": 2, "ep": 2, "micro_batch": GLOBAL_BATCH // 4,
                "resume_from": "pp2xep2xdp2", "resume_step": RESUME_AT},
               {"name": "tp2xpp2xep2_etp2", "tp": 2, "pp": 2, "ep": 2, "etp": 2, "micro_batch": GLOBAL_BATCH // 4},
               {"name": "tp2xpp2xep2_sp", "tp": 2, "pp": 2, "ep": 2, "sp": True, "micro_batch": GLOBAL_BATCH // 4}]
    out = launch(8, {"parity": dict(reference, layouts=layouts)}, tmp_path)
    _assert_parity(out["parity"], ["pp2xep2xdp2", "tp2xpp2xep2", "pp2xep2xdp2_resumed", "tp2xpp2xep2_from_pp2xep2xdp2",
                                   "tp2xpp2xep2_etp2", "tp2xpp2xep2_sp"], reference)
    _assert_resumed(out["parity"], reference, "pp2xep2xdp2_resumed", source="pp2xep2xdp2")  # 3-D: bitwise
    _assert_resumed(out["parity"], reference, "tp2xpp2xep2_from_pp2xep2xdp2")  # tp1→2, dp4→2: a 3-D change
