"""Starting a multi-process check and ending one: used by tests/distributed/test_*.py (the `launch` side) and their
worker scripts (the `report` side). Run through those tests: `python -m pytest tests/distributed`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(worker: str, nproc: int, spec: dict, tmp) -> dict:
    """Run `worker SPEC.json` under torchrun on `nproc` CPU ranks (gloo, one thread each); rank 0's results."""
    spec = dict(spec, out=str(tmp / f"out{nproc}.json"))
    path = tmp / f"spec{nproc}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           worker, str(path)], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp / f"out{nproc}.json").read_text())


def start() -> tuple[dict, int, int]:
    """The worker's beginning: (its spec, rank, world size), one CPU thread per rank."""
    import torch

    torch.set_num_threads(1)
    return json.load(open(sys.argv[1])), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def report(spec: dict, rank: int, results: dict) -> None:
    """The worker's end: rank 0 writes the results where `launch` reads them, then every rank leaves together."""
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
