"""The checkpoint folder protocol: atomic saves, markers and manifests read defensively, choosing what to resume,
pruning. What goes into the files is scimoe/checkpoint/contents.py's business.

Tested by `python -m pytest tests/train/test_checkpoint.py tests/train/test_resume_robustness.py
tests/distributed/test_kill.py`. A checkpoint is written into a hidden temporary folder, every file fsynced,
the folder renamed to `step_{N:08d}` and only then is the `COMPLETE` marker created (temp file, fsync,
rename). A folder is resumable when it can be read, its marker is a JSON object of this format version and
every file matches its SHA-256 in `MANIFEST.json`; anything else makes it unusable, with the path and the
reason in the log, and resume falls back to an older one. Nothing here deletes or overwrites a folder it
cannot read: such a folder in the way of a new save is moved aside. A save that fails (disk full, I/O
error) on any rank fails on every rank as a CheckpointSaveError naming the checkpoint, and leaves the
previous complete checkpoint the one resume uses.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Callable

from scimoe.errors import RunError
from scimoe.parallel.dims import ParallelDims
from scimoe.checkpoint.async_save import AsyncSaver, wait_for_parts

FORMAT_VERSION = 2
CONVENTIONS = {"fope_clipped_sin": 1}
"""Numerical conventions a checkpoint's weights assume, written into every marker: the sine of FoPE's clipped
frequencies is the constant 1 (the released Intern-S1-Pro's; scimoe before 2026-12-04 used 0)."""
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
log = logging.getLogger("scimoe")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RunError, ValueError):
    """No checkpoint can be resumed although some exist, or the one asked for is unusable."""


class CheckpointFolderError(CheckpointError):
    """The checkpoints folder exists but cannot be listed (permissions, I/O): nothing may be assumed about it,
    so the run stops before touching anything (`scimoe-train` exits 2)."""

    exit_code = 2


class CheckpointSaveError(RunError, RuntimeError):
    """Writing a checkpoint failed (the message names it); the previous complete one is untouched."""


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(run_dir), f"step_{step:08d}")


def _fsync_write(path: str, data: bytes) -> str:
    """Write, flush and fsync `data`; returns its SHA-256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(run_dir: str, step: int, files: Callable[[], dict[str, bytes]], dims: ParallelDims = ParallelDims(),
          saver: AsyncSaver | None = None, marker: dict | None = None,
          on_complete: Callable[[], None] | None = None) -> str:
    """Save checkpoint `step` atomically (every rank calls this): `files()` gives this rank's {name: bytes}.
    With `saver` the files are encoded and written in the background; `on_complete` runs on rank 0 once the
    marker is in place. Raises CheckpointSaveError on every rank when any rank's part failed."""
    rank, world = dims.rank, dims.world_size
    final, root = step_dir(run_dir, step), checkpoint_root(run_dir)
    tmp = os.path.join(root, f".step_{step:08d}.tmp")
    marker = {"step": step, "format_version": FORMAT_VERSION, "world": world, "conventions": CONVENTIONS,
              **(marker or {})}
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as err:
            log.error("checkpoint %s: cannot create %s: %s", final, tmp, err)
    dims.barrier()

    def write_part() -> None:
        suffix = f"_rank{rank:05d}"
        try:
            digests = {name: _fsync_write(os.path.join(tmp, name), data) for name, data in files().items()}
            _fsync_write(os.path.join(tmp, f".manifest{suffix}.json"), json.dumps(digests).encode())
        except OSError as err:
            try:  # tell rank 0 to stop waiting for this part
                _fsync_write(os.path.join(tmp, f".failed{suffix}"), str(err).encode())
            except OSError as marker_err:
                log.error("checkpoint %s: rank %d could not leave its failure marker either (%s); an asynchronous "
                          "save waits for this part until its timeout", final, rank, marker_err)
            raise CheckpointSaveError(f"saving checkpoint {final} failed on rank {rank}: {err}") from err

    def complete() -> None:
        try:
            if saver is not None:
                wait_for_parts(tmp, world)
            _complete(tmp, final, marker)
        except (OSError, TimeoutError, CheckpointSaveError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(f"saving checkpoint {final} failed: {err}") from err
        if on_complete is not None:
            on_complete()

    def in_background() -> None:
        try:
            write_part()
        except CheckpointSaveError:
            if rank == 0:  # once every rank is done with the folder, nothing of this save is left behind
                wait_for_parts(tmp, world, failed_too=True, besides=0)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if rank == 0:
            complete()

    if saver is not None:
        saver.submit(in_background)
        return final
    error = None
    try:
        write_part()
    except CheckpointSaveError as err:
        error = err
    if dims.any_rank(error is not None):  # also the barrier before rank 0 completes the folder
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or CheckpointSaveError(f"saving checkpoint {final} failed on another rank")
    if rank == 0:
        try:
            complete()
        except CheckpointSaveError as err:
            error = err
    if dims.any_rank(error is not None):
        raise error or CheckpointSaveError(f"saving checkpoint {final} failed on rank 0")
    return final


def _complete(tmp: str, final: str, marker: dict) -> None:
    """Rank 0, once every rank's files are in `tmp`: manifest, rename into place, then the marker."""
    manifest: dict[str, str] = {}
    for part in sorted(n for n in os.listdir(tmp) if n.startswith(".manifest")):
        with open(os.path.join(tmp, part)) as f:
            manifest.update(json.load(f))
        os.remove(os.path.join(tmp, part))
    _fsync_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    if os.path.lexists(final):
        _clear_the_way(final)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(final))
    marker_tmp = os.path.join(final, f".{MARKER}.tmp")
    _fsync_write(marker_tmp, json.dumps(marker).encode())
    os.rename(marker_tmp, os.path.join(final, MARKER))
    _fsync_dir(final)


def _clear_the_way(final: str) -> None:
    """An earlier save of this step is in the way: delete it when it is our own debris (readable, no marker),
    otherwise move it aside untouched."""
    try:
        readable_debris = MARKER not in os.listdir(final)
    except OSError:
        readable_debris = False
    if readable_debris:
        shutil.rmtree(final)
        return
    aside = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.replaced-{int(time.time())}")
    os.rename(final, aside)
    log.warning("%s was in the way of a new save and could not be checked; moved aside to %s, not deleted",
                final, aside)


def read_marker(path: str) -> dict:
    """The marker of checkpoint `path`; CheckpointError naming the path and the reason when unusable."""
    try:
        with open(os.path.join(path, MARKER), "rb") as f:
            marker = json.loads(f.read())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: no {MARKER} marker (a save cut short)") from err
    except OSError as err:
        raise CheckpointError(f"{path}: {MARKER} cannot be read: {err}") from err
    except ValueError as err:
        raise CheckpointError(f"{path}: {MARKER} is not JSON ({err})") from err
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CheckpointError(f"{path}: {MARKER} is not a marker (no integer step)")
    if marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {marker.get('format_version')!r}; this scimoe reads "
                              f"format_version {FORMAT_VERSION} only")
    return marker


def verify(path: str) -> list[str]:
    """What is wrong with the files of checkpoint `path`, one line a file: missing, unreadable (with the
    errno), or a SHA-256 other than its manifest's."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, "rb") as f:
            manifest = json.loads(f.read())
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        return [f"{manifest_path} is missing"]
    except OSError as err:
        return [f"{manifest_path} cannot be read ({err})"]
    except ValueError as err:
        return [f"{manifest_path} is not a JSON object ({err})"]
    bad = []
    for name, digest in manifest.items():
        file = os.path.join(path, name)
        try:
            with open(file, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                    bad.append(f"{file} does not match {MANIFEST}")
        except FileNotFoundError:
            bad.append(f"{file} is missing")
        except OSError as err:
            bad.append(f"{file} cannot be read ({err})")
    return bad


def problem(path: str) -> str | None:
    """Why checkpoint `path` cannot be resumed, or None when it can."""
    try:
        os.listdir(path)
        read_marker(path)
    except OSError as err:
        return f"{path}: unreadable ({err})"
    except CheckpointError as err:
        return str(err)
    bad = verify(path)
    return f"{path}: " + "; ".join(bad) if bad else None


def _readable(path: str) -> bool:
    return os.access(path, os.R_OK | os.X_OK)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def step_folders(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every `step_N` folder, complete or not, oldest first. Only a checkpoints folder that does
    not exist means "none"; one that cannot be listed is a CheckpointFolderError naming it and the errno."""
    root = checkpoint_root(run_dir)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise CheckpointFolderError(f"{root} cannot be listed ({err}): refusing to guess whether it holds "
                                    f"checkpoints; nothing was changed. Fix its permissions and run again") from err
    return sorted((int(m.group(1)), os.path.join(root, n)) for n in names if (m := _STEP_DIR.match(n)))


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint with a marker, oldest first."""
    return [(s, p) for s, p in step_folders(run_dir) if is_complete(p)]


def find_resume_path(run_dir: str, resume: str, key: str = "checkpoint.resume") -> str | None:
    """Folder to resume from for `checkpoint.resume`, or None to start fresh.

    `auto` takes the newest usable checkpoint, reporting each unusable one (a folder whose save was cut
    short, without a marker, is skipped quietly); when checkpoints exist but none is usable it stops, listing
    each and why, unless `auto_or_fresh` asks to start over. An explicit path must be usable."""
    if resume == "never":
        return None
    if resume not in ("auto", "auto_or_fresh"):
        reason = problem(resume)
        if reason:
            raise CheckpointError(f"{key}: cannot resume '{resume}': {reason}")
        return resume
    unusable = []
    for _, path in reversed(step_folders(run_dir)):
        if _readable(path) and not is_complete(path):
            log.info("skipping %s: no %s marker (a save cut short)", path, MARKER)
            continue
        reason = problem(path)
        if reason is None:
            return path
        log.error("checkpoint cannot be resumed: %s; falling back to an older one", reason)
        unusable.append(reason)
    if unusable and resume == "auto":
        raise CheckpointError("no checkpoint of this run can be resumed:\n  " + "\n  ".join(unusable) +
                              f"\nFix or remove them, or pass {key}=auto_or_fresh to start over from step 0 "
                              "(they are kept either way)")
    if unusable:
        log.warning("%s=auto_or_fresh: no usable checkpoint, starting from step 0", key)
    return None


def size_bytes(path: str) -> int:
    """Bytes of the files of checkpoint `path` (OSError when it cannot be read)."""
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def prune(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); one that cannot be deleted is
    reported and kept."""
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        try:
            shutil.rmtree(path)
        except OSError as err:
            log.warning("could not prune %s: %s", path, err)
