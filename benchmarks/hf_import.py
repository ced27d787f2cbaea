"""Reading a Hugging Face folder rank by rank (`checkpoint.init_weights=hf:PATH`): throughput per rank and peak
resident memory per rank, for 1, 2 and 4 expert-parallel ranks, beside the folder's size.

Run: `python benchmarks/hf_import.py [--gb 1.0]`. Generates (once, under /tmp) a bf16 folder of about --gb GB whose
experts dominate it (the shape of the released model), then for each world size launches torchrun running this
file as a worker: each rank builds its part on the meta device and reads its slices (timed), and reports its
peak resident memory above the start. The single rank's numbers are the baseline of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scimoe.config import Config, DataConfig, LoggerConfig, ModelConfig, MoEConfig, TrainConfig  # noqa: E402


def model_config(gb: float) -> ModelConfig:
    experts = 64
    ffn = max(64, int(gb * 2**30 / 2 / (8 * experts * 3 * 256)) // 64 * 64)  # bf16: 2 bytes a parameter
    return ModelConfig(hidden=256, layers=8, heads=8, kv_heads=2, head_dim=32, vocab_size=4096,
                       moe=MoEConfig(num_experts=experts, top_k=8, n_groups=4, ffn_hidden=ffn))


def make_folder(folder: str, cfg: ModelConfig) -> None:
    from omegaconf import OmegaConf

    from scimoe.convert import cli
    from scimoe.model import build_model
    from scimoe.checkpoint import contents, shards, storage

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    state = {k: (torch.zeros if k.endswith(("selection_bias", "expert_output_ema")) else torch.randn)(s, dtype=torch.bfloat16)
             * 0.02 for k, s in shapes.items()}
    entries = {k: (k, t, shards.placement(t, None)) for k, t in state.items()}
    run = folder + "_ckpt"
    start = contents.write(run, 1, entries, None, None, OmegaConf.to_yaml(OmegaConf.structured(Config(model=cfg))))
    cli.export(start, folder, max_shard_bytes=512 * 2**20)


def worker(folder: str, gb: float, out: str) -> None:
    from scimoe.parallel.dims import ParallelDims
    from scimoe.train.session import Session
    from tests.peak_memory import peak_rss_during

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    cfg = Config(model=model_config(gb), train=TrainConfig(steps=1, global_batch=world, micro_batch=1),
                 data=DataConfig(source="synthetic"), logger=LoggerConfig(kind="none"))
    cfg.parallel.ep, cfg.checkpoint.init_weights, cfg.checkpoint.resume = world, f"hf:{folder}", "never"
    dims = ParallelDims.from_config(cfg.parallel, world, rank).build_groups()
    import deepspeed.utils.groups  # noqa: F401  (modules, not the model)

    def load():
        began = time.perf_counter()
        with Session(cfg, tempfile.mkdtemp(), dims) as session:
            session.resume()
            own = sum(p.numel() * 2 for p in session.model.parameters())  # bf16 bytes on disk
        return own, time.perf_counter() - began

    (own, seconds), extra = peak_rss_during(load)
    everyone = dims.all_gather_object({"read_gb": own / 1e9, "seconds": seconds, "peak_extra_gib": extra / 2**30})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0, help="approximate size of the generated folder")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.gb, args.worker[1])
    folder = os.path.join(tempfile.gettempdir(), f"scimoe_hf_bench_{args.gb:g}gb")
    if not os.path.exists(folder):
        make_folder(folder, model_config(args.gb))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    print(f"folder: {size / 1e9:.2f} GB bf16 in {folder} (64 experts × 8 layers: experts are "
          f"{100 * (1 - 12e6 / (size / 2)):.0f}% of it); {os.cpu_count()} cores")
    base = None
    for world in (1, 2, 4):
        out = os.path.join(tempfile.mkdtemp(), "out.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
               "--gb", str(args.gb), "--worker", folder, out]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        ranks = json.load(open(out))
        rate = sum(r["read_gb"] / r["seconds"] for r in ranks) / world
        peak = max(r["peak_extra_gib"] for r in ranks)
        base = base or (rate, peak)
        print(f"{world} rank(s): {rate:5.2f} GB/s per rank ({rate / base[0]:.2f}× one rank), reads "
              f"{ranks[0]['read_gb']:.2f} GB each, peak memory {peak:5.2f} GiB per rank ({peak / base[1]:.2f}× one rank)")


if __name__ == "__main__":
    main()
