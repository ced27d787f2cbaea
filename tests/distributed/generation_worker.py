"""Generation and GRPO in parallel layouts, launched by tests/distributed/test_generation.py as
`torchrun --standalone --nproc_per_node=N tests/distributed/generation_worker.py SPEC.json`.

`generate`: each layout loads the same initial weights, samples greedily and with a seeded generator, scores the
rollout as GRPO does and reports tokens, log-probs, recorded experts (gathered over pipeline stages) and scored
log-probs. `grpo`: each layout runs a few GRPO steps from the same weights and reports its metrics. Rank 0
writes SPEC's `out` JSON; the test compares with one process.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from safetensors.torch import load_file  # noqa: E402

from scimoe.config import compose_config  # noqa: E402
from tests.distributed.launching import report, start  # noqa: E402
from scimoe.model import build_model  # noqa: E402
from scimoe.parallel.dims import ParallelDims  # noqa: E402
from scimoe.parallel.parallelize import parallelize  # noqa: E402
from scimoe.rl.generate import Policy, sample  # noqa: E402
from scimoe.rl.scoring import logprob_head, rollout_batch  # noqa: E402
from scimoe.train.step import forward_with_head  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 3]
MODES = {"greedy": {"temperature": 1.0, "top_k": 1}, "sampled": {"temperature": 1.0, "top_k": 0}}


def generation_config(layout: dict):
    cfg = compose_config(["model.zero_init_output=false", "logger=none"])
    for key in ("tp", "pp", "ep", "etp", "sequence_parallel", "pp_layers"):
        if key in layout:
            setattr(cfg.parallel, key, layout[key])
    return cfg


def generate(model, dims, chunks, mode: str) -> dict:
    """One rollout of PROMPT (4 samples, 8 new tokens, never stopping early) and its scoring, as plain data."""
    everyone_done = (lambda mine: not dims.any_rank(not mine)) if dims.ep > 1 else None
    rollout = sample(Policy(model, dims, chunks), PROMPT, n=4, max_new=8, eos_id=-1, top_p=1.0,
                     generator=torch.Generator().manual_seed(11), everyone_done=everyone_done, **MODES[mode])
    with torch.no_grad():
        extras, _ = forward_with_head(model, chunks, rollout_batch([rollout], True, dims.tp if dims.sp else 1),
                                      logprob_head(model.comm, 1.0), dims, backward=False)
    stages = dims.all_gather_object([None if e is None else e.tolist() for e in rollout.experts], over="pp")
    experts = [next(s[j] for s in stages if s[j] is not None) for j in range(len(rollout.experts))]
    return {"tokens": rollout.tokens.tolist(), "logprobs": rollout.logprobs.tolist(), "experts": experts,
            "scored": extras["logp"].tolist()}


def run_generation(spec: dict, rank: int, world: int) -> dict:
    initial = load_file(spec["initial_weights"])
    out = {}
    for layout in spec["layouts"]:
        cfg = generation_config(layout)
        dims = ParallelDims.from_config(cfg.parallel, world, rank).build_groups()
        model = build_model(cfg.model)
        model.load_state_dict(initial)
        chunks = parallelize(model, dims)
        out[layout["name"]] = {mode: generate(model, dims, chunks, mode) for mode in MODES}
    return out


def run_grpo(spec: dict, rank: int, world: int) -> dict:
    from scimoe.rl.grpo import grpo

    out = {}
    for layout in spec["layouts"]:
        cfg = compose_config(["recipe=grpo", "train.steps=3", "grpo.max_new_tokens=3", "grpo.kl_coef=0.05",
                              "grpo.prompts_per_step=4", "logger=none", "checkpoint.resume=never"])
        for key in ("tp", "pp", "ep", "etp", "sequence_parallel", "pp_layers"):
            if key in layout:
                setattr(cfg.parallel, key, layout[key])
        cfg.model.layers = layout.get("layers", cfg.model.layers)
        records = grpo(cfg, os.path.join(spec["workdir"], layout["name"]), ParallelDims.from_config(cfg.parallel, world, rank))
        out[layout["name"]] = [{k: r[k] for k in ("loss", "reward_mean", "grad_norm", "kl", "response_length")}
                               for r in records]
    return out


def main() -> None:
    spec, rank, world = start()
    results = {}
    if "generate" in spec:
        results["generate"] = run_generation(spec["generate"], rank, world)
    if "grpo" in spec:
        results["grpo"] = run_grpo(spec["grpo"], rank, world)
    report(spec, rank, results)


if __name__ == "__main__":
    main()
