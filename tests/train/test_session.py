"""What every recipe gets from the session, checked on GRPO (which used to lack it) and pretraining:
`python -m pytest tests/train/test_session.py`."""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from scimoe.config import compose_config
from scimoe.rl.grpo import grpo
from scimoe.checkpoint import contents, storage
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _grpo(*overrides: str):
    return compose_config(["recipe=grpo", "logger=jsonl", *overrides])


def test_grpo_keeps_only_the_last_checkpoints_it_is_asked_to(tmp_path):
    records = grpo(_grpo("train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=1"), str(tmp_path))
    assert len(records) == 4
    assert [s for s, _ in storage.complete_checkpoints(str(tmp_path))] == [4]
    assert (tmp_path / "FINISHED").read_text().strip() == "4"


def test_grpo_stops_on_its_time_budget_with_a_checkpoint(tmp_path):
    records = grpo(_grpo("train.steps=50", "train.max_minutes=1e-9"), str(tmp_path))
    assert len(records) == 1
    assert [s for s, _ in storage.complete_checkpoints(str(tmp_path))] == [1]
    assert not (tmp_path / "FINISHED").exists()  # not finished: a requeued job continues it


def test_grpo_async_save_writes_the_same_checkpoint_as_a_synchronous_one(tmp_path):
    grpo(_grpo("train.steps=3", "checkpoint.every=2"), str(tmp_path / "sync"))
    grpo(_grpo("train.steps=3", "checkpoint.every=2", "checkpoint.async_save=true"), str(tmp_path / "async"))
    for step in (2, 3):
        manifests = [json.loads((tmp_path / run / "checkpoints" / f"step_{step:08d}" / "MANIFEST.json").read_text())
                     for run in ("sync", "async")]
        tensors = lambda m: {k: v for k, v in m.items() if k.endswith(".safetensors")}  # noqa: E731
        assert tensors(manifests[0]) == tensors(manifests[1]) and len(tensors(manifests[0])) == 2, step


def test_grpo_in_bf16_runs_its_forwards_under_autocast(tmp_path, monkeypatch):
    from scimoe.model.transformer import MoETransformer

    seen = []
    forward = MoETransformer.forward

    def recording(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MoETransformer, "forward", recording)
    records = grpo(_grpo("train.steps=2", "train.dtype=bf16", "grpo.kl_coef=0.05"), str(tmp_path))
    assert len(records) == 2 and all(r["skipped"] == 0 for r in records)
    # rollout (one forward per token), old log-probs, reference log-probs and the update: every one in bf16
    assert len(seen) >= 8 and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen), seen


def test_grpo_saves_and_exits_zero_on_sigusr1(tmp_path):
    cmd = [sys.executable, "-m", "scimoe.train", "recipe=grpo", "train.steps=5000", "hydra.run.dir=run"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # what Slurm sends before the time limit
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-3000:]
    assert "stop requested (SIGUSR1)" in output
    saved = storage.complete_checkpoints(str(tmp_path / "run"))
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert saved and saved[-1][0] == logged[-1] < 5000


def test_a_signal_during_start_up_exits_cleanly_before_the_first_step(tmp_path):
    """The handler is installed before torch, Hydra or the data load: a SIGTERM then ends the run with rc 0."""
    cmd = [sys.executable, "-c", "import os, signal, sys; sys.argv = ['scimoe-train', 'train.steps=5', "
           "'hydra.run.dir=run']; import scimoe.train.__main__ as m; os.kill(os.getpid(), signal.SIGTERM); m.main()"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stop requested (SIGTERM) before the first step" in out.stdout + out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").read_text().strip()
    assert not (tmp_path / "run" / "FINISHED").exists()


def _wandb_history(run: str) -> tuple[list[int], dict | None]:
    """(history steps, branch point) of one offline wandb run, read from its transaction log: the W&B header
    (7 bytes), then LevelDB log blocks of 32 KiB whose chunks (crc, length, type) carry protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(glob.glob(os.path.join(run, "*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, steps, branch = 7, b"", [], None
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):  # FULL or LAST ends a record
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            steps.append(record.history.step.num)
        elif record.WhichOneof("record_type") == "run":
            for item in record.run.config.update:
                if item.key == "_wandb":
                    branch = json.loads(item.value_json).get("branch_point")
    return steps, branch


def test_a_resumed_run_rewinds_its_wandb_run_to_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = tiny_config(steps=4)
    c.logger.kind, c.checkpoint.every = "wandb", 2
    pretrain(c, str(tmp_path / "run"))
    # as if the run had crashed after logging steps 3 and 4 but before checkpoint 4 was complete
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    os.remove(tmp_path / "run" / "FINISHED")
    pretrain(c, str(tmp_path / "run"))
    runs = sorted(glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*")))
    assert len(runs) == 2
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert all(os.path.exists(os.path.join(r, f"run-{run_id}.wandb")) for r in runs), runs  # one wandb run
    assert _wandb_history(runs[0]) == ([1, 2, 3, 4], None)
    # rewound to step 2, so that wandb takes steps 3 and 4 again instead of rejecting them
    assert _wandb_history(runs[1]) == ([3, 4], {"run_id": run_id, "step": 2})
    c.checkpoint.resume = "never"  # a new run in the same folder is a new wandb run
    pretrain(c, str(tmp_path / "run"))
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() != run_id


def test_a_resume_that_changes_the_balance_statistics_scope_warns(tmp_path, caplog):
    c = tiny_config(steps=2, global_batch=4, micro_batch=2)
    pretrain(c, str(tmp_path))
    c = tiny_config(steps=3, global_batch=4, micro_batch=1)
    with caplog.at_level(logging.INFO, logger="scimoe"):
        pretrain(c, str(tmp_path))
    assert "balance statistics over train.micro_batch × dp = 1 × 1 = 1 sequences" in caplog.text
    assert "took balance statistics over 2 sequences, this run over 1" in caplog.text


def test_finished_is_written_when_a_resume_has_nothing_left_to_do(tmp_path):
    steps = 3
    pretrain(tiny_config(steps=steps), str(tmp_path))
    (tmp_path / "FINISHED").unlink()  # killed between the last checkpoint and the marker
    assert pretrain(tiny_config(steps=steps), str(tmp_path)).records == []
    assert (tmp_path / "FINISHED").read_text().strip() == str(steps)


def test_step_lines_count_against_the_total_and_a_finished_run_says_how_to_continue(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="scimoe"):
        pretrain(tiny_config(steps=3), str(tmp_path / "run"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(" | eta " in line for line in lines) and lines[-1].endswith("eta 0s")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scimoe"):
        again = pretrain(tiny_config(steps=3), str(tmp_path / "run")).records
    assert again == [] and "already at step 3 (train.steps=3): nothing to train; pass train.steps=4 or more" \
        in caplog.text
