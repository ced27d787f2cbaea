"""The default run folder, identical on every rank of one launch (Hydra's timestamp is not).

`hydra.run.dir` defaults to `outputs/${scimoe_run_id:}`. Ranks of one job must agree without talking,
so the id comes from what the launcher gave them all: the Slurm job id, torchrun's rendezvous id, or
(for a standalone torchrun, whose run id is 'none') the start time of the torchrun agent that is the
common parent of all local ranks. A plain process uses its own start time.
"""
from __future__ import annotations

import os
import time

from omegaconf import OmegaConf

_FORMAT = "%Y-%m-%d_%H-%M-%S"


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of `pid` from /proc (Linux); None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def run_id(env: dict[str, str] | None = None) -> str:
    """An id shared by every rank of one launch."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"-{env['SLURM_STEP_ID']}" if env.get("SLURM_STEP_ID") else "")
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if "LOCAL_RANK" in env:
        started = _process_start_time(os.getppid())
        if started is not None:
            return time.strftime(_FORMAT, time.localtime(int(started)))
    return time.strftime(_FORMAT)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("scimoe_run_id"):
        OmegaConf.register_new_resolver("scimoe_run_id", lambda: run_id(), use_cache=True)
    if not OmegaConf.has_resolver("scimoe_nodes"):  # Slurm nodes for cluster.gpus (hydra/launcher/slurm.yaml)
        OmegaConf.register_new_resolver("scimoe_nodes", lambda gpus, per_node: max(1, int(gpus) // int(per_node)))


FINISHED = "FINISHED"
"""Written by rank 0 when a run reaches train.steps; the Slurm job script requeues until it exists."""


def clear_finished(run_dir: str) -> None:
    """A run that still has steps to go is not finished (an earlier, shorter run may have said so)."""
    if os.path.exists(os.path.join(run_dir, FINISHED)):
        os.remove(os.path.join(run_dir, FINISHED))


def mark_finished(run_dir: str, step: int) -> None:
    with open(os.path.join(run_dir, FINISHED), "w") as f:
        f.write(f"{step}\n")
