"""Slurm launch: `python -m pytest tests/launch/test_slurm.py`.

The sbatch script for a 4-node × 8-GPU Intern-S1-Pro run equals the reviewed golden file (regenerate
with the command in its test after an intended change and review the diff); bash parses it; bad
layouts stop before anything is queued; the hydra-submitit launchers compose and run a local sweep.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from scimoe.config import register_configs
from scimoe.run_dir import register_resolvers
from scimoe.launch.slurm import main, render, sbatch_script

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "intern_s1_pro_4x8_h100.sbatch")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["model=intern_s1_pro", "cluster.gpus=32", "cluster.gpu=h100", "parallel.tp=2", "parallel.pp=2",
        "parallel.ep=4", "train.micro_batch=1", "cluster.partition=gpu", "cluster.account=sci",
        "hydra.run.dir=/scratch/scimoe/run1", "logger=wandb", "logger.mode=online"]


def test_four_nodes_of_eight_gpus_match_the_golden_script(tmp_path, capsys):
    main(["slurm", *ARGS])
    script = capsys.readouterr().out
    with open(GOLDEN) as f:
        assert script == f.read()
    lines = script.splitlines()
    assert "#SBATCH --nodes=4" in lines and "#SBATCH --gpus-per-node=8" in lines
    assert "#SBATCH --signal=USR1@120" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --account=sci" in lines
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert any(line.startswith("srun ") and line.rstrip().endswith("torchrun \\") for line in lines)
    assert '    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:29500" --rdzv-id="$SLURM_JOB_ID" \\' in lines
    assert any("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in line for line in lines)
    assert "    parallel.ep=4 \\" in lines and "    checkpoint.resume=auto \\" in lines
    assert "export WANDB_MODE=online" in lines
    assert '    scontrol requeue "$SLURM_JOB_ID"' in lines
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0  # bash parses it


def test_layouts_that_do_not_fit_the_cluster_are_refused_by_name(capsys):
    with pytest.raises(ValueError, match="not divisible by parallel.tp"):
        sbatch_script(["cluster.gpus=24", "parallel.tp=16"])
    with pytest.raises(ValueError, match="cluster.gpus.*whole number of nodes"):
        sbatch_script(["cluster.gpus=12"])
    with pytest.raises(SystemExit) as stop:
        main(["slurm", "cluster.gpu=h900"])
    assert stop.value.code == 2
    assert "cluster.gpu" in capsys.readouterr().err
    with pytest.raises(KeyError, match="nodes"):
        render("--nodes={{nodes}}", {})


def test_submitit_launchers_compose_from_the_cluster_settings():
    register_configs()
    register_resolvers()
    with initialize_config_module("scimoe.configs", version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "cluster.gpus=32", "cluster.gpus_per_node=8"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (4, 8, 8)
    assert launcher["signal_delay_s"] == 120


def test_a_local_multirun_of_two_tiny_configs_completes(tmp_path):
    cmd = [sys.executable, "-m", "scimoe.train", "-m", "hydra/launcher=local", "train.lr=1e-3,2e-3", "train.steps=2",
           "data=synthetic", "data.synthetic_rows=16", "train.seq_len=32", "train.global_batch=2", "train.micro_batch=2",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        metrics = (tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 2 and (tmp_path / "sweep" / job / "FINISHED").read_text() == "2\n"
    lrs = [OmegaConf.load(tmp_path / "sweep" / job / ".hydra" / "config.yaml").train.lr for job in ("0", "1")]
    assert lrs == [1e-3, 2e-3]
