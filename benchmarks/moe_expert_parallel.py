"""MoE layer forward+backward at ep1/ep2/ep4 on 4 ranks (same global tokens), time split by phase.

Run: `torchrun --standalone --nproc_per_node=4 benchmarks/moe_expert_parallel.py [--tokens 4096]`.
Every layout runs in the same launch on the same 4 ranks (ep1 = plain data parallel, each rank with
all experts). Phases are timed with barriers around them on rank 0's clock: router, dispatch (token
sort + count exchange + all-to-all), expert compute, combine (all-to-all back + weighted sum), and the
backward. Prints tokens/s and the share of the step spent communicating; ratios are against ep1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from scimoe.config import MoEConfig
from scimoe.model.moe.layer import MoELayer
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.expert import ParallelMoE, apply_expert_parallel


class _One(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def moe_layers(self):
        return [self.moe]


def phase_times(layer: MoELayer, x: torch.Tensor, iters: int) -> dict[str, float]:
    """Median seconds per phase of forward, plus the whole backward."""
    samples: dict[str, list[float]] = {k: [] for k in ("router", "dispatch", "experts", "combine", "backward")}
    flat = x.view(-1, x.shape[-1])
    for i in range(iters + 1):
        marks = [time.perf_counter()]

        def mark():
            dist.barrier()
            marks.append(time.perf_counter())

        dist.barrier()
        marks[0] = time.perf_counter()
        routing = layer.router(flat)
        mark()
        sent = layer.comm.dispatch(flat, routing.indices)
        mark()
        out = layer.experts(sent.x, sent.counts)
        mark()
        y = layer.comm.combine(out, routing.weights, sent)
        mark()
        y.sum().backward()
        mark()
        layer.zero_grad(set_to_none=True)
        if i:  # first iteration warms up
            for key, a, b in zip(samples, marks, marks[1:]):
                samples[key].append(b - a)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--experts", type=int, default=64)
    args = parser.parse_args()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = MoEConfig(num_experts=args.experts, top_k=8, n_groups=4, ffn_hidden=128, aux_loss_coef=0.0,
                    group_balance_coef=0.0)
    results = {}
    for ep in (1, 2, 4):
        if world % ep:
            continue
        dims = ParallelDims(world_size=world, rank=rank, ep=ep).build_groups()
        torch.manual_seed(0)
        layer = MoELayer(256, cfg)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02)
        apply_expert_parallel(_One(layer), dims)
        layer.comm = ParallelMoE(dims, args.experts)
        torch.manual_seed(1 + rank)
        x = torch.randn(1, args.tokens // world, 256, requires_grad=True)
        results[ep] = phase_times(layer, x, args.iters)
    if rank == 0:
        print(f"{world} ranks, {args.tokens} global tokens, E={args.experts} K=8 G=4 hidden=256 ffn=128, fp32, "
              f"{torch.get_num_threads()} threads/rank; median of {args.iters}")
        base = sum(results[1].values())
        for ep, t in results.items():
            total = sum(t.values())
            comm = t["dispatch"] + t["combine"]
            split = "  ".join(f"{k} {v * 1e3:6.1f}ms" for k, v in t.items())
            print(f"ep{ep}: {args.tokens / total:8.0f} tokens/s ({base / total:.2f}x ep1) | {split} | "
                  f"dispatch+combine {100 * comm / total:4.1f}% of step")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
