"""Multi-process checks, launched by tests/distributed/test_*.py as
`torchrun --standalone --nproc_per_node=N tests/distributed/worker.py SPEC.json`.

One launch runs every check the spec lists (process start-up with megatron imports costs seconds per
rank, so layouts are grouped): `parity` trains each layout from the same initial weights on the same
global batches and records per-step loss / grad norm and the gathered final weights' deviation from
the single-process reference (a layout with `resume_from` starts from another layout's checkpoint); `dispatch` and `grad_norm` exercise the expert-parallel dispatcher and
the global gradient norm on hand-made cases; `recompute` trains layouts with each train.recompute mode, `buckets` with each gradient-bucket setting,
`master` with bf16 weights / fp32 masters, offload and ZeRO. Rank 0 writes SPEC's `out` JSON; the test asserts.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from safetensors.torch import load_file  # noqa: E402

from scimoe.config import Config  # noqa: E402
from tests.distributed.launching import report, start  # noqa: E402
from scimoe.model.moe.layer import MoELayer  # noqa: E402
from scimoe.parallel.dims import ParallelDims  # noqa: E402
from scimoe.parallel.expert import ParallelMoE, apply_expert_parallel, expert_parameters  # noqa: E402
from scimoe.parallel.deepspeed_groups import register_with_deepspeed  # noqa: E402
from scimoe.parallel.runtime import clip_grad_norm  # noqa: E402
from scimoe.train.pretrain import pretrain  # noqa: E402
from tests.distributed.parity_config import parity_config  # noqa: E402


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def run_parity(spec: dict, rank: int, world: int) -> dict:
    ref = json.load(open(spec["reference"]))
    ref_state_numel = ref["optimizer_state_numel"]
    initial = load_file(spec["initial_weights"])
    final_ref = load_file(spec["final_weights"])
    results = {}
    for layout in spec["layouts"]:
        cfg = parity_config(micro_batch=layout["micro_batch"])
        cfg.parallel.ep, cfg.parallel.tp, cfg.parallel.pp = layout["ep"], layout.get("tp", 1), layout.get("pp", 1)
        cfg.parallel.zero = layout.get("zero", 1)
        cfg.parallel.pp_virtual = layout.get("pp_virtual", 1)
        cfg.parallel.pp_layers = layout.get("pp_layers")
        cfg.parallel.sequence_parallel = layout.get("sp", False)
        cfg.parallel.etp = layout.get("etp", 1)
        cfg.parallel.cp = layout.get("cp", 1)
        cfg.checkpoint.every = layout.get("save_every", 0)
        first = layout.get("resume_step", 0)  # resume another layout's checkpoint at this step
        if first:
            cfg.checkpoint.resume = os.path.join(spec["workdir"], layout["resume_from"], "checkpoints", f"step_{first:08d}")
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        # Balance terms are micro-batch statistics: the union over dp ranks of micro-batch m must be
        # the reference's micro-batch m, or the layouts compute different losses.
        assert layout["micro_batch"] * dims.data_parallel == ref["micro_batch"], (layout, dims.dp, ref["micro_batch"])
        run = pretrain(cfg, os.path.join(spec["workdir"], layout["name"]), dims=dims, initial_state=initial,
                       gather_final_weights=True)
        got = [(r["loss"], r["grad_norm"]) for r in run.records]
        want = list(zip(ref["losses"], ref["grad_norms"]))[first:]
        # ‖W − W_ref‖ / ‖W_ref‖ per tensor: elementwise maxima are dominated by the few entries whose
        # gradients are ~0, where Adam's normalised step turns 1e-7 rounding into a full-size update.
        deviations = {k: float((run.final_weights[k] - final_ref[k]).norm() / (final_ref[k].norm() + 1e-12))
                      for k in final_ref}
        worst = max(deviations, key=deviations.get)
        results[layout["name"]] = {
            "loss_rel": max(rel(g[0], w[0]) for g, w in zip(got, want)),
            "grad_norm_rel": max(rel(g[1], w[1]) for g, w in zip(got, want)),
            "grad_norm_rel_per_step": [rel(g[1], w[1]) for g, w in zip(got, want)],
            "weight_rel": deviations[worst], "worst_weight": worst, "steps": first + len(got),
            "losses": [r["loss"] for r in run.records],
            "expert_counts": [r["moe"]["tokens_per_expert"] for r in run.records],
            "layer_balance": [r["moe"]["balance_loss"] for r in run.records],
            "optimizer_state_share": run.optimizer_state_numel / ref_state_numel,
        }
    return results


class Holder(torch.nn.Module):
    """A one-layer "model" for the expert-parallel functions, which walk a model's MoE layers."""

    def __init__(self, moe: MoELayer) -> None:
        super().__init__()
        self.moe = moe

    def moe_layers(self) -> list[MoELayer]:
        return [self.moe]


def _layer(ep: int, rank: int, world: int):
    """The same E=8, K=2 MoE layer on every rank (seeded), expert-sharded over `world` ranks."""
    from scimoe.config import MoEConfig

    torch.manual_seed(0)
    full = MoELayer(16, MoEConfig(num_experts=8, top_k=2, n_groups=2, ffn_hidden=16, aux_loss_coef=0.0,
                                  group_balance_coef=0.0))
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.3)
    dims = ParallelDims(world_size=world, rank=rank, ep=ep).build_groups()
    sharded = MoELayer(16, full.cfg)
    sharded.load_state_dict(full.state_dict())

    holder = Holder(sharded)
    apply_expert_parallel(holder, dims)
    register_with_deepspeed(dims, expert_parameters(holder))
    sharded.comm = ParallelMoE(dims, full.cfg.num_experts)  # balance terms are off: no statistics are summed
    return full, holder, dims


def run_dispatch(rank: int, world: int) -> dict:
    """Router-chosen, skewed (every token to experts 0 and 4) and one-owner routing (experts 0 and 1,
    so every other rank receives zero tokens) against the unsharded layer on the same tokens."""
    full, holder, _ = _layer(world, rank, world)
    sharded = holder.moe
    out = {}
    torch.manual_seed(100 + rank)
    tokens = 3 + 2 * rank  # uneven token counts per rank
    cases = {
        "balanced": None,
        "skewed": torch.tensor([[0, 4]]).repeat(tokens, 1),
        "all_on_rank0": torch.tensor([[0, 1]]).repeat(tokens, 1),  # experts 0,1 live on rank 0: others receive 0
    }
    for name, replay in cases.items():
        x = torch.randn(1, tokens, 16, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        with torch.no_grad():
            chosen = replay if replay is not None else sharded.router(x.view(-1, 16)).indices
            probe = sharded.comm.dispatch(x.detach().view(-1, 16), chosen)
            received, send_splits = int(probe.counts.sum()), probe.send_splits
        y, _ = sharded(x, replay)
        y_ref, _ = full(x_ref, replay)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        local = sharded.experts.num_experts
        keep = slice(rank * local, (rank + 1) * local)
        # Expert weight grads on the owner must equal the sum over all ranks' tokens.
        ref_grad = full.experts.down_proj.grad.clone()
        dist.all_reduce(ref_grad)
        ref_grad = ref_grad[keep]
        out[name] = {
            "y": float((y - y_ref).abs().max()), "x_grad": float((x.grad - x_ref.grad).abs().max()),
            "expert_grad": float((sharded.experts.down_proj.grad - ref_grad).abs().max()),
            "received": received, "send_splits": send_splits, "tokens": tokens,
        }
        for m in (full, sharded):
            m.zero_grad(set_to_none=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return {f"rank{r}": v for r, v in enumerate(gathered)}


def run_grad_norm(rank: int, world: int) -> dict:
    """Unequal expert gradients per ep rank: the global norm must count every shard exactly once."""
    _, model, dims = _layer(world, rank, world)
    sharded = model.moe
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # dense: identical on all ranks
    for p in sharded.experts.parameters():
        p.grad = torch.full_like(p, float(rank + 1))  # experts: rank r's shard has grads r+1
    dense_sq = sum(p.numel() * 0.25 for n, p in model.named_parameters() if ".experts." not in n)
    expert_numel = sum(p.numel() for p in sharded.experts.parameters())
    expected = (dense_sq + sum(expert_numel * (r + 1) ** 2 for r in range(world))) ** 0.5
    got = clip_grad_norm(model, dims, max_norm=1.0)
    clipped = sum(float(p.grad.double().pow(2).sum()) for p in sharded.experts.parameters())
    dist.all_reduce(t := torch.tensor(clipped, dtype=torch.float64))
    dense_after = sum(float(p.grad.double().pow(2).sum()) for n, p in model.named_parameters() if ".experts." not in n)
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state as ps

    name = f"ep_size_{world}"
    moe_groups = split_params_into_different_moe_groups_for_optimizer([{"params": list(model.parameters()), "name": "all"}])
    deepspeed = {
        "same_ep_ranks": ds_groups._get_expert_parallel_group_ranks(name)
        == dist.get_process_group_ranks(ps.get_expert_model_parallel_group()),
        "same_expert_dp_ranks": ds_groups._get_expert_data_parallel_group_ranks(name)
        == dist.get_process_group_ranks(ps.get_expert_data_parallel_group()),
        "moe_params_are_experts": {id(p) for p in model.parameters() if is_moe_param(p)}
        == {id(p) for p in sharded.experts.parameters()},
        "moe_optimizer_group": any(g.get("moe") and len(g["params"]) == 2 for g in moe_groups),
        "mpu_dp_rank": ds_groups.mpu.get_data_parallel_rank() == ps.get_data_parallel_rank(),
    }
    return {"norm": got, "expected": expected, "norm_after_clip": (float(t) + dense_after) ** 0.5,
            "deepspeed": deepspeed}


def mm_config(fixture: str, micro_batch: int, **parallel) -> Config:
    """The multimodal parity run: tiny_mm on the fixture, 4 steps, lr 1e-3 (see parity_config)."""
    from scimoe.config import compose_config

    cfg = compose_config(["model=tiny_mm", "data=multimodal", f"data.path={fixture}", "data.max_bad_fraction=0.5",
                          "train.seq_len=256", "train.global_batch=4", f"train.micro_batch={micro_batch}",
                          "train.steps=4", "train.lr=1e-3", "train.warmup_steps=2", "train.grad_clip=0.5",
                          "model.zero_init_output=false", "logger=none", "checkpoint.resume=never"])
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def run_mm_parity(spec: dict, rank: int, world: int) -> dict:
    """tiny_mm (vision + time-series encoders) in each layout from the same initial weights."""
    initial = load_file(spec["initial_weights"])
    out = {}
    for layout in spec["layouts"]:
        par = {k: layout.get(k, 1) for k in ("tp", "pp", "ep", "cp")}
        cfg = mm_config(spec["fixture"], layout["micro_batch"], **par)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        run = pretrain(cfg, os.path.join(spec["workdir"], layout["name"]), dims=dims, initial_state=initial)
        out[layout["name"]] = {"losses": [r["loss"] for r in run.records], "grad_norms": [r["grad_norm"] for r in run.records],
                               "tokens": [r["tokens_by_modality"] for r in run.records]}
    return out


def run_recompute(spec: dict, rank: int, world: int) -> dict:
    """Each layout trained with train.recompute none, selective and full from the same initial weights: per-step
    losses and grad norms, and whether the final weights equal the `none` run's bit for bit."""
    from scimoe.model import recompute

    initial = load_file(spec["initial_weights"])
    regions = {"n": 0}
    plain = recompute._contexts

    def counted():  # every checkpointed region asks for its contexts once, in the forward
        regions["n"] += 1
        return plain()

    recompute._contexts = counted
    out = {}
    for layout in spec["layouts"]:
        runs, counts = {}, {}
        for mode in ("none", "selective", "full"):
            regions["n"] = 0
            cfg = parity_config(micro_batch=layout["micro_batch"])
            cfg.train.steps, cfg.train.recompute = spec["steps"], mode
            for key in ("tp", "pp", "ep", "etp", "pp_virtual"):
                setattr(cfg.parallel, key, layout.get(key, 1))
            cfg.parallel.sequence_parallel = layout.get("sp", False)
            dims = ParallelDims.from_config(cfg.parallel, world, rank)
            run = pretrain(cfg, os.path.join(spec["workdir"], f"{layout['name']}_{mode}"), dims=dims,
                           initial_state=initial, gather_final_weights=True)
            runs[mode], counts[mode] = run, regions["n"]
        base = runs["none"].final_weights
        out[layout["name"]] = {mode: {"losses": [r["loss"] for r in run.records],
                                      "grad_norms": [r["grad_norm"] for r in run.records],
                                      "weights_equal": all(torch.equal(run.final_weights[k], base[k]) for k in base)
                                      and run.final_weights.keys() == base.keys(), "regions": counts[mode]}
                               for mode, run in runs.items()}
    return out


def run_buckets(spec: dict, rank: int, world: int) -> dict:
    """Each layout trained with each (overlap, bucket size) variant from the same initial weights: per-step losses,
    grad norms, buckets started during the backward, and whether the final weights equal the first variant's."""
    from scimoe.parallel.grad_buckets import GradBuckets

    initial = load_file(spec["initial_weights"])
    early: list[int] = []
    finish = GradBuckets.finish

    def counted(self):
        finish(self)
        early.append(self.started_in_backward)

    GradBuckets.finish = counted
    out = {}
    for layout in spec["layouts"]:
        runs = {}
        for variant in spec["variants"]:
            early.clear()
            cfg = parity_config(micro_batch=layout["micro_batch"])
            cfg.train.steps = spec["steps"]
            for key in ("tp", "pp", "ep", "pp_virtual"):
                setattr(cfg.parallel, key, layout.get(key, 1))
            cfg.parallel.overlap_grad_reduce, cfg.parallel.grad_bucket_mb = variant["overlap"], variant["bucket_mb"]
            dims = ParallelDims.from_config(cfg.parallel, world, rank)
            run = pretrain(cfg, os.path.join(spec["workdir"], f"{layout['name']}_{variant['name']}"), dims=dims,
                           initial_state=initial, gather_final_weights=True)
            runs[variant["name"]] = (run, list(early))
        base = runs[spec["variants"][0]["name"]][0].final_weights
        out[layout["name"]] = {name: {"losses": [r["loss"] for r in run.records],
                                      "grad_norms": [r["grad_norm"] for r in run.records], "started_early": started,
                                      "weights_equal": run.final_weights.keys() == base.keys()
                                      and all(torch.equal(run.final_weights[k], base[k]) for k in base)}
                               for name, (run, started) in runs.items()}
    return out


def run_master(spec: dict, rank: int, world: int) -> dict:
    """Layouts trained with mixed-precision options (dtype, offload, zero) from the same initial weights; one with
    `resave_from` first resumes another layout's checkpoint and saves it again straight away (what it loaded, in
    the file format), then continues to `steps`."""
    from scimoe.checkpoint import contents, storage
    from scimoe.train.session import Session

    initial = load_file(spec["initial_weights"])
    out = {}
    for layout in spec["layouts"]:
        cfg = parity_config(micro_batch=2)
        cfg.train.steps, cfg.checkpoint.every = layout["steps"], layout.get("every", 0)
        cfg.train.dtype, cfg.train.optimizer_offload = layout.get("dtype", "fp32"), layout.get("offload", "none")
        cfg.parallel.zero = layout.get("zero", 1)
        for key in ("tp", "pp", "ep"):
            setattr(cfg.parallel, key, layout.get(key, 1))
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        run_dir = os.path.join(spec["workdir"], layout["name"])
        if "resave_from" in layout:
            source = os.path.join(spec["workdir"], layout["resave_from"])
            cfg.checkpoint.resume = source
            with Session(cfg, os.path.join(spec["workdir"], layout["name"] + "_resaved"), dims) as session:
                state = session.resume()
                session.save(state["step"], state["loader"])
        run = pretrain(cfg, run_dir, dims=dims, initial_state=initial)
        out[layout["name"]] = {"losses": [r["loss"] for r in run.records],
                               "state_numel": dims.all_gather_object(run.optimizer_state_numel)}
    return out


def run_memory(spec: dict, rank: int, world: int) -> dict:
    """Measured vs planned bytes on every rank for each layout of spec["memory"]."""
    from tests.distributed.memory_check import measure
    from tests.plan.test_memory_plan import memory_config

    out = {}
    for layout in spec["layouts"]:
        cfg = memory_config(**{k: v for k, v in layout.items() if k != "name"}, world=world)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        mine = measure(cfg, dims, os.path.join(spec["workdir"], layout["name"]))
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        out[layout["name"]] = everyone
    return out


def main() -> None:
    spec, rank, world = start()
    results = {}
    if "parity" in spec:
        results["parity"] = run_parity(spec["parity"], rank, world)
    if spec.get("dispatch"):
        results["dispatch"] = run_dispatch(rank, world)
    if "mm_parity" in spec:
        results["mm_parity"] = run_mm_parity(spec["mm_parity"], rank, world)
    if "memory" in spec:
        results["memory"] = run_memory(spec["memory"], rank, world)
    if "recompute" in spec:
        results["recompute"] = run_recompute(spec["recompute"], rank, world)
    if "buckets" in spec:
        results["buckets"] = run_buckets(spec["buckets"], rank, world)
    if "master" in spec:
        results["master"] = run_master(spec["master"], rank, world)
    if spec.get("grad_norm"):
        results["grad_norm"] = run_grad_norm(rank, world)
    report(spec, rank, results)


if __name__ == "__main__":
    main()
