"""Peak memory per rank and step time of the memory options, as ratios to the plain path, in the same run.

Run: `python benchmarks/memory_modes.py [--steps 4]`. For the tiny model and a 4-layer 64-expert model, on 2
ranks (dp2) and 4 ranks (ep2×dp2), each variant trains `--steps` steps under torchrun (gloo, 1 thread per
rank, seq 256, ZeRO-1): the baseline (fp32 weights and AdamW, gradient buckets summed after the backward),
overlapped bucket sums, bf16 weights with sharded fp32 masters, then + selective, + full recomputation and
+ DeepSpeed CPU Adam offload. Each rank reports, and the table shows the worst rank's:
- `RSS`: peak resident memory above the moment before the Session is built (sampled every millisecond).
  On a CPU this includes oneDNN's bf16 kernel caches (~330 MiB per process whatever the model size: the
  bf16 rows of the tiny model are mostly that) and counts offloaded state too (host and device are one
  memory here), so it shows what a CPU run costs, not what a GPU would hold;
- `device`: what a GPU would hold at the step's peak, from the tensors themselves: weights, gradient
  buffers, optimizer state not offloaded, plus the bytes autograd saves for one micro-batch (a
  saved_tensors_hooks count, recomputed blocks counting the inputs they keep);
- the median step time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "tiny": {},
    "4L-64E": {"layers": 4, "hidden": 256, "heads": 8, "kv_heads": 2, "head_dim": 32,
               "moe": {"num_experts": 64, "top_k": 8, "n_groups": 8, "ffn_hidden": 256}},
}
VARIANTS = {"fp32": {"parallel.overlap_grad_reduce": False},
            "overlap": {},
            "bf16": {"train.dtype": "bf16"},
            "+selective": {"train.dtype": "bf16", "train.recompute": "selective"},
            "+full": {"train.dtype": "bf16", "train.recompute": "full"},
            "+offload": {"train.dtype": "bf16", "train.recompute": "full", "train.optimizer_offload": "cpu"}}
LAYOUTS = {2: {}, 4: {"ep": 2}}


def worker(spec: dict) -> None:
    import torch

    from scimoe.config import Config, DataConfig, LoggerConfig, ModelConfig, MoEConfig, TrainConfig
    from scimoe.parallel.dims import ParallelDims
    from scimoe.train.session import Session
    from scimoe.train.step import train_step
    from scimoe.data.loader import StepLoader
    from scimoe.data.sources import build_rows
    from tests.peak_memory import peak_rss_during
    from scimoe.model import recompute
    from scimoe.parallel.grad_buckets import param_grad

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    model = dict(MODELS[spec["model"]])
    moe = MoEConfig(**model.pop("moe", {}))
    cfg = Config(model=ModelConfig(moe=moe, **model), data=DataConfig(source="synthetic", synthetic_rows=64),
                 train=TrainConfig(steps=spec["steps"], global_batch=2 * world, micro_batch=1, seq_len=256),
                 logger=LoggerConfig(kind="none"))
    cfg.checkpoint.resume, cfg.checkpoint.every = "never", 0
    cfg.parallel.ep = LAYOUTS[world].get("ep", 1)
    for key, value in VARIANTS[spec["variant"]].items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    dims = ParallelDims.from_config(cfg.parallel, world, rank).build_groups()
    rows = build_rows(cfg, spec["workdir"])
    times: list[float] = []

    def run() -> None:
        nonlocal session
        session = Session(cfg, spec["workdir"], dims)
        loader = StepLoader(rows, cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seed, dims.groups.dp_rank,
                            dims.dp)
        loader_state["loader"] = loader
        for _ in range(spec["steps"]):
            batches = loader.next_step()
            start = time.perf_counter()
            train_step(session.model, session.optimizer, batches, cfg.train.grad_clip, cfg.train.dtype, dims,
                       session.chunks, session.buckets)
            times.append(time.perf_counter() - start)

    session, loader_state = None, {}
    _, peak = peak_rss_during(run)
    model, opt = session.model, session.optimizer
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    plain = recompute.checkpoint

    def keeping(fn, *args, **kwargs):
        for arg in args:
            for t in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(t, torch.Tensor):
                    pack(t)
        return plain(fn, *args, **kwargs)
    recompute.checkpoint = keeping
    batches = loader_state["loader"].next_step()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, opt, batches[:1], cfg.train.grad_clip, cfg.train.dtype, dims, session.chunks, session.buckets)
    recompute.checkpoint = plain
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    buffers = [b.buffer for b in session.buckets.buckets] if session.buckets else \
        [g for g in map(param_grad, model.parameters()) if g is not None]
    state = nbytes(model.parameters()) + nbytes(buffers)
    if cfg.train.optimizer_offload == "none":
        state += nbytes(t for _, st in opt.parameter_states() for t in st.values())
        state += nbytes(getattr(opt, "masters", {}).values())
    mine = {"peak_mib": peak / 2**20, "step_s": statistics.median(times[1:] or times),
            "device_mib": (state + sum(saved.values())) / 2**20}
    everyone = dims.all_gather_object(mine)
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(everyone, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.load(open(args.worker)))
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    print(f"{'model':<8} {'ranks':>5} {'variant':<10} {'RSS MiB':>8} {'device MiB':>10} {'step s':>7} {'RSS':>6} "
          f"{'device':>6} {'time':>6}")
    for model in MODELS:
        for world in LAYOUTS:
            base = None
            for variant in VARIANTS:
                with tempfile.TemporaryDirectory() as tmp:
                    spec = {"model": model, "variant": variant, "steps": args.steps, "workdir": tmp,
                            "out": os.path.join(tmp, "out.json")}
                    path = os.path.join(tmp, "spec.json")
                    json.dump(spec, open(path, "w"))
                    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={world}", __file__, "--worker", path], env=env, check=True,
                                   capture_output=True)
                    ranks = json.load(open(spec["out"]))
                peak = max(r["peak_mib"] for r in ranks)
                device = max(r["device_mib"] for r in ranks)
                step = max(r["step_s"] for r in ranks)
                base = base or (peak, device, step)
                print(f"{model:<8} {world:>5} {variant:<10} {peak:>8.0f} {device:>10.1f} {step:>7.3f} "
                      f"{peak / base[0]:>5.2f}× {device / base[1]:>5.2f}× {step / base[2]:>5.2f}×", flush=True)


if __name__ == "__main__":
    main()
