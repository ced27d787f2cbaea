"""Resume survives every partial write an operator meets: `python -m pytest tests/train/test_resume_robustness.py`.

Cut metrics lines, garbage markers, unreadable folders, every checkpoint corrupt, full disks during sync and
async saves. The kill tests (tests/distributed/test_kill.py) cover SIGKILL at fixed and random moments.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest

from scimoe.checkpoint import contents, storage
from scimoe.checkpoint.storage import CheckpointError, CheckpointSaveError
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(steps: int, **checkpoint_keys):
    c = tiny_config(steps=steps)
    c.checkpoint.every = 2
    for key, value in checkpoint_keys.items():
        setattr(c.checkpoint, key, value)
    return c


def _steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]


@pytest.fixture()
def run4(tmp_path) -> str:
    """A finished 4-step run with checkpoints at steps 2 and 4, and its losses."""
    run = str(tmp_path / "run")
    pretrain(_cfg(4), run)
    return run


def test_a_cut_metrics_line_is_dropped_with_a_warning_and_resume_goes_on(run4, caplog):
    with open(os.path.join(run4, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 5.1, "lm_loss"')  # a write cut by a kill or a full disk
    with caplog.at_level(logging.WARNING, logger="scimoe"):
        pretrain(_cfg(6), run4)
    assert f"{os.path.join(run4, 'metrics.jsonl')}:5: dropped a cut or unreadable metrics line" in caplog.text
    assert _steps(run4) == [1, 2, 3, 4, 5, 6]


def test_a_failed_metrics_write_loses_that_line_only(tmp_path, monkeypatch, caplog):
    from scimoe.train import metrics

    real = metrics.JsonlLogger.log
    failed = []

    def log_with_a_full_disk(self, record):
        if record["step"] == 3 and not failed:
            failed.append(True)
            real_write = self._file.write
            self._file.write = lambda data: (real_write(data[:40]), (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")))[1]
            try:
                return real(self, record)
            finally:
                self._file.write = real_write
        return real(self, record)

    monkeypatch.setattr(metrics.JsonlLogger, "log", log_with_a_full_disk)
    run = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="scimoe"):
        pretrain(_cfg(4), run)
    assert "metrics of step 3 not written (" in caplog.text
    assert _steps(run) == [1, 2, 4]  # no half line left behind for step 4 to continue
    assert [s for s, _ in storage.complete_checkpoints(run)] == [2, 4]
    assert storage.find_resume_path(run, "auto") == storage.step_dir(run, 4)


def test_garbage_in_the_marker_falls_back_to_the_previous_checkpoint(run4, caplog):
    with open(os.path.join(storage.step_dir(run4, 4), "COMPLETE"), "w") as f:
        f.write("\x00\x17garbage{")
    with caplog.at_level(logging.ERROR, logger="scimoe"):
        assert storage.find_resume_path(run4, "auto") == storage.step_dir(run4, 2)
    assert f"{storage.step_dir(run4, 4)}: COMPLETE is not JSON" in caplog.text
    with pytest.raises(CheckpointError, match="COMPLETE is not JSON"):
        storage.find_resume_path(run4, storage.step_dir(run4, 4))
    pretrain(_cfg(5), run4)  # retrains steps 3-4 from step 2, and the broken step 4 is moved aside, not deleted
    assert _steps(run4) == [1, 2, 3, 4, 5]
    assert storage.problem(storage.step_dir(run4, 4)) is None


def test_an_unreadable_newest_checkpoint_is_reported_kept_and_never_deleted(run4, monkeypatch, caplog):
    newest = storage.step_dir(run4, 4)
    real_listdir = os.listdir

    def listdir(path="."):
        if os.path.abspath(path) == os.path.abspath(newest):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)  # as root chmod alone does not deny reading
    os.chmod(newest, 0)
    try:
        with caplog.at_level(logging.WARNING, logger="scimoe"):
            pretrain(_cfg(6), run4)
    finally:
        monkeypatch.undo()
        for folder in [newest] + [os.path.join(storage.checkpoint_root(run4), n)
                                  for n in os.listdir(storage.checkpoint_root(run4)) if ".replaced-" in n]:
            os.chmod(folder, stat.S_IRWXU)
    assert f"{newest}: unreadable" in caplog.text
    aside = [n for n in os.listdir(storage.checkpoint_root(run4)) if n.startswith(".step_00000004.replaced-")]
    assert len(aside) == 1 and "moved aside" in caplog.text  # the unreadable folder survives, renamed
    assert sorted(os.listdir(os.path.join(storage.checkpoint_root(run4), aside[0]))) == \
        sorted(os.listdir(storage.step_dir(run4, 2)))
    assert _steps(run4) == [1, 2, 3, 4, 5, 6] and storage.problem(newest) is None


def test_an_unlistable_checkpoints_folder_stops_the_run_before_anything_is_touched(run4, monkeypatch):
    root = storage.checkpoint_root(run4)
    real_listdir = os.listdir

    def listdir(path="."):
        if os.path.abspath(path) == os.path.abspath(root):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)  # as root chmod 000 alone does not deny listing
    metrics_before = open(os.path.join(run4, "metrics.jsonl")).read()
    with pytest.raises(storage.CheckpointFolderError, match=r"checkpoints cannot be listed \(\[Errno 13\]"):
        pretrain(_cfg(6), run4)
    with pytest.raises(storage.CheckpointFolderError):
        pretrain(_cfg(6, on_save_error="continue"), run4)
    monkeypatch.undo()
    assert open(os.path.join(run4, "metrics.jsonl")).read() == metrics_before  # not truncated
    assert os.path.exists(os.path.join(run4, "FINISHED"))  # the finished run stays finished
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000004"]  # nothing moved aside


def test_an_unreadable_weight_file_is_reported_as_unreadable_not_as_a_mismatch(run4):
    newest = storage.step_dir(run4, 4)
    weights = os.path.join(newest, "model_rank00000.safetensors")
    os.remove(weights)
    os.mkdir(weights)  # open() fails with EISDIR, as an unreadable file fails with EACCES
    assert storage.problem(newest) == f"{newest}: {weights} cannot be read ([Errno 21] Is a directory: '{weights}')"
    os.rmdir(weights)
    assert storage.problem(newest) == f"{newest}: {weights} is missing"


def test_when_every_checkpoint_is_corrupt_the_run_stops_listing_them(run4, tmp_path):
    for step in (2, 4):
        with open(os.path.join(storage.step_dir(run4, step), "model_rank00000.safetensors"), "r+b") as f:
            f.seek(200)
            f.write(b"\xff\xfe")
    with pytest.raises(CheckpointError, match=r"no checkpoint of this run can be resumed:\n.*step_00000004.*\n.*step_00000002"):
        pretrain(_cfg(6), run4)
    cmd = [sys.executable, "-m", "scimoe.train", "train.steps=6", "train.global_batch=4", "train.micro_batch=2",
           "train.seq_len=64", "checkpoint.every=2", f"hydra.run.dir={run4}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "step_00000004" in out.stderr and "step_00000002" in out.stderr and "auto_or_fresh" in out.stderr
    fresh = pretrain(_cfg(2, resume="auto_or_fresh"), run4).records  # an explicit start over
    assert [r["step"] for r in fresh] == [1, 2]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_that_fails_on_a_full_disk_stops_the_run_naming_the_checkpoint(tmp_path, monkeypatch, async_save):
    real = storage._fsync_write

    def full_disk(path, data):
        if ".step_00000004.tmp" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, data)

    monkeypatch.setattr(storage, "_fsync_write", full_disk)
    run = str(tmp_path / "run")
    with pytest.raises(CheckpointSaveError, match=r"saving checkpoint .*step_00000004 failed.*No space left"):
        pretrain(_cfg(6, async_save=async_save), run)
    assert storage.find_resume_path(run, "auto") == storage.step_dir(run, 2)  # the previous one stays
    assert not os.path.exists(storage.step_dir(run, 4)) and not (tmp_path / "run" / "FINISHED").exists()
    monkeypatch.undo()
    pretrain(_cfg(6, async_save=async_save), run)  # space freed: the rerun continues from step 2
    assert [s for s, _ in storage.complete_checkpoints(run)] == [2, 4, 6]


def test_on_save_error_continue_trains_on_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, caplog):
    real = storage._fsync_write
    monkeypatch.setattr(storage, "_fsync_write", lambda path, data: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")) if ".step_00000002.tmp" in path else real(path, data))
    run = str(tmp_path / "run")
    with caplog.at_level(logging.ERROR, logger="scimoe"):
        records = pretrain(_cfg(4, on_save_error="continue", async_save=True), run).records
    assert len(records) == 4 and "on_save_error=continue: training goes on" in caplog.text
    assert [s for s, _ in storage.complete_checkpoints(run)] == [4]
    assert not [n for n in os.listdir(storage.checkpoint_root(run)) if n.endswith(".tmp")]


def test_a_save_warns_early_when_the_disk_has_less_room_than_the_last_checkpoint(run4, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with caplog.at_level(logging.WARNING, logger="scimoe"):
        pretrain(_cfg(6), run4)
    assert f"checkpoint {storage.step_dir(run4, 6)} needs about" in caplog.text and "may fail" in caplog.text
