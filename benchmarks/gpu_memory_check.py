"""GPU check for issue #12: the planner's peak per GPU against `torch.cuda.max_memory_allocated`, one process.

Run on a machine with one GPU (a few minutes): `python benchmarks/gpu_memory_check.py`; smoke-test it on a CPU
with `python benchmarks/gpu_memory_check.py --model tiny --seq 256` (there the peak comes from torch's MemTracker,
as in tests/distributed/memory_check.py). For each variant (fp32; bf16 with fp32 masters; + selective and full
recomputation; + optimizer offload) it trains 3 steps of the tiny preset or a 2-layer Intern-S1-Pro-shaped slice
(hidden 4096, Intern-S1-Pro attention, `--experts` experts of width 1536, top-8 in 8 groups) and prints the
measured peak of a step after the first, the planner's figure (`scimoe.plan.memory`) and their ratio.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from scimoe.config import Config, DataConfig, LoggerConfig, ModelConfig, MoEConfig, TrainConfig
from scimoe.data.loader import StepLoader
from scimoe.data.sources import build_rows
from scimoe.plan.memory import plan_memory
from scimoe.train.session import Session, to_device
from scimoe.train.step import train_step

VARIANTS = {"fp32": {}, "bf16": {"dtype": "bf16"}, "bf16+selective": {"dtype": "bf16", "recompute": "selective"},
            "bf16+full": {"dtype": "bf16", "recompute": "full"},
            "bf16+full+offload": {"dtype": "bf16", "recompute": "full", "optimizer_offload": "cpu"}}


def config(model: str, experts: int, seq: int, **train) -> Config:
    if model == "tiny":
        model_cfg = ModelConfig(max_positions=max(seq, 4096))
    else:
        model_cfg = ModelConfig(name="intern_s1_pro_slice", vocab_size=155008, hidden=4096, layers=2, heads=64,
                                kv_heads=4, head_dim=128, max_positions=262144, zero_init_output=False,
                                moe=MoEConfig(num_experts=experts, top_k=8, n_groups=8, ffn_hidden=1536))
    cfg = Config(model=model_cfg, data=DataConfig(source="synthetic", synthetic_rows=16),
                 train=TrainConfig(steps=3, global_batch=1, micro_batch=1, seq_len=seq, warmup_steps=1, **train),
                 logger=LoggerConfig(kind="none"))
    cfg.checkpoint.resume, cfg.checkpoint.every = "never", 0
    return cfg


def measure(cfg: Config) -> int:
    """Peak bytes of a step after the first (the optimizer state exists by then)."""
    with tempfile.TemporaryDirectory() as run_dir, Session(cfg, run_dir) as session:
        model, opt = session.model, session.optimizer
        loader = StepLoader(build_rows(cfg, run_dir), 1, 1, 0, 0, 1)

        def step() -> None:
            batches = [to_device(mb, session.device) for mb in loader.next_step()]
            train_step(model, opt, batches, cfg.train.grad_clip, cfg.train.dtype, session.dims, session.chunks,
                       session.buckets)
        step()
        if session.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(), step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        state = [t for o in opt.local_optimizers() for st in o.state.values() for t in st.values() if torch.is_tensor(t)]
        tracker.track_external(model, *state, *getattr(opt, "masters", {}).values(),
                               *(b.buffer for b in (session.buckets.buckets if session.buckets else [])))
        with tracker:  # one step: MemTracker follows one iteration per module
            step()
        return sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "slice"), default="slice")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    print(f"{'variant':<18} {'measured GiB':>12} {'planned GiB':>11} {'planned/measured':>16}")
    for name, train in VARIANTS.items():
        cfg = config(args.model, args.experts, args.seq, **train)
        measured = measure(cfg)
        stage = plan_memory(cfg, 1).stages[0]
        planned = stage.total() + (stage.host_resident_bytes_per_rank[0] if stage.host_bytes_per_rank and
                                   not torch.cuda.is_available() else 0)  # on a CPU the host is the device
        print(f"{name:<18} {measured / 2**30:>12.3f} {planned / 2**30:>11.3f} {planned / measured:>16.3f}", flush=True)


if __name__ == "__main__":
    main()
