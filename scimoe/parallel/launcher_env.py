"""Who am I in the job: torchrun's environment, or a bare `srun`'s (one task per GPU, no torchrun).

Tested by `python -m pytest tests/launch/test_env.py`. `apply_launcher_env()` runs before any process group
is created: under torchrun it changes nothing; under srun it sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR (the first host of SLURM_JOB_NODELIST) and MASTER_PORT (from the job id,
unless set) from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, so `init_process_group(env://)` just works.
"""
from __future__ import annotations

import os
import re


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ('gpu[001-003,007],login1') as host names, in order
    (what `scontrol show hostnames` prints; no scontrol needed)."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def launcher(env: dict[str, str] | None = None) -> str:
    """`torchrun`, `srun` (a Slurm task with no torchrun around it) or `single`."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "srun"
    return "single"


def srun_environment(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's env:// variables for a task of a bare srun."""
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST"):
        if key not in env:
            raise ValueError(f"running under srun but {key} is not set; launch with srun or torchrun")
    nodes = max(1, int(env.get("SLURM_NNODES", "1")))
    return {
        "RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(int(env["SLURM_NTASKS"]) // nodes),
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def apply_launcher_env(env: dict[str, str] | None = None) -> str:
    """Fill torch.distributed's variables from Slurm's when needed; returns the launcher found."""
    env = os.environ if env is None else env
    kind = launcher(env)
    if kind == "srun":
        env.update(srun_environment(env))
    return kind
