"""Rollout throughput in parallel layouts against one process, and where the time goes.

Run: `python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/rollout_layouts.py`.
The tiny preset (hidden 128, 4 layers, 16 experts top-4, FoPE), 8 samples of a 32-token prompt, 64 new tokens,
KV cache. Rank 0 first measures one process alone (the baseline, same run); then every rank runs tp2, pp2 and
ep2. Communication is the time spent inside torch.distributed calls (wrapped here only); compute is the
rest. Each layout's tokens are checked against the baseline's. Median of 3.
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import torch.distributed as dist

from scimoe.config import compose_config
from scimoe.model import build_model
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.parallelize import parallelize
from scimoe.rl.generate import Policy, sample

COMM_SECONDS = [0.0]


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COMM_SECONDS[0] += time.perf_counter() - began
    return wrapper


for _name in ("all_reduce", "all_gather", "all_to_all_single", "broadcast", "send", "recv", "all_gather_object"):
    setattr(dist, _name, _timed(getattr(dist, _name)))


def rollout(policy: Policy, dims: ParallelDims | None, prompt: list[int], new: int) -> tuple[float, float, torch.Tensor]:
    times, comms, tokens = [], [], None
    everyone_done = (lambda mine: not dims.any_rank(not mine)) if dims is not None and dims.ep > 1 else None
    for _ in range(3):
        COMM_SECONDS[0] = 0.0
        began = time.perf_counter()
        out = sample(policy, prompt, n=8, max_new=new, eos_id=-1, temperature=1.0, top_k=0, top_p=1.0,
                     generator=torch.Generator().manual_seed(0), everyone_done=everyone_done)
        times.append(time.perf_counter() - began)
        comms.append(COMM_SECONDS[0])
        tokens = out.tokens
    return 8 * new / statistics.median(times), statistics.median(comms) / statistics.median(times), tokens


def main() -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.set_num_threads(1)
    cfg = compose_config(["model.zero_init_output=false", "logger=none"])
    initial = build_model(cfg.model, seed=0).state_dict()
    prompt, new = list(range(20, 52)), 64
    baseline = None
    if rank == 0:
        model = build_model(cfg.model)
        model.load_state_dict(initial)
        rate, _, baseline = rollout(Policy(model), None, prompt, new)
        print(f"{world} ranks on {os.cpu_count()} cores, 1 thread each; 8 × {new} new tokens, tiny preset, fp32")
        print(f"one process  {rate:8.0f} tok/s   1.00×   [baseline]")
    for layout in ({"tp": 2}, {"pp": 2}, {"ep": 2}):
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1)
        dims = ParallelDims.from_config(cfg.parallel, world, rank).build_groups()
        model = build_model(cfg.model)
        model.load_state_dict(initial)
        chunks = parallelize(model, dims)
        layout_rate, comm_share, tokens = rollout(Policy(model, dims, chunks), dims, prompt, new)
        if rank == 0:
            name = "".join(f"{k}{v}" for k, v in layout.items())
            same = "same tokens" if torch.equal(tokens, baseline) else "TOKENS DIFFER"
            print(f"{name:<12} {layout_rate:8.0f} tok/s   {layout_rate / rate:.2f}×   compute {1 - comm_share:4.0%} | "
                  f"communication {comm_share:4.0%}   ({same})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
