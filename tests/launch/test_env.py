"""Launcher detection: `python -m pytest tests/launch/test_env.py`.

torchrun's variables are used as they are; a bare srun's SLURM_* are turned into torch's env://
variables; and two processes started with only Slurm's variables (no torchrun) train together.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from scimoe.parallel.launcher_env import apply_launcher_env, expand_nodelist, launcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_slurm_nodelists_expand_like_scontrol_show_hostnames():
    assert expand_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]


def test_torchrun_variables_win_and_are_left_alone():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert apply_launcher_env(env) == "torchrun"
    assert env["RANK"] == "3" and "MASTER_ADDR" not in env


def test_bare_srun_variables_become_torch_distributed_ones():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456"}
    assert apply_launcher_env(env) == "srun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")
    assert env["MASTER_ADDR"] == "gpu017" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == "single"  # an interactive one-task srun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_only_slurm_variables_train_as_one_job(tmp_path):
    common = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_NNODES="1",
                  SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=str(_free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        common.pop(key, None)
    cmd = [sys.executable, "-m", "scimoe.train", "parallel.ep=2", "train.steps=2", "data=synthetic",
           "data.synthetic_rows=16", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=1"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=dict(common, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "TP1-PP1-EP2-DP2" in outputs[0]
    run = tmp_path / "outputs" / "slurm-4242"  # the run folder comes from the job id, the same on both
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
