"""The run around a recipe's loop, shared by pretraining, SFT and GRPO: layout, model on its device,
optimizer, resume, logger, checkpoint cadence (`every`, `keep_last`, async save), preemption (signals and
`train.max_minutes`), the skipped-steps guard, and the FINISHED marker.

Used as `with Session(cfg, run_dir) as s:` by scimoe/train/pretrain.py and scimoe/rl/grpo.py; tested by
`python -m pytest tests/train/test_session.py tests/train/test_pretrain.py tests/rl`. A recipe reads:

    with Session(cfg, run_dir) as session:
        state = session.resume()                 # None, or the train state of the checkpoint resumed
        for step in session.steps():             # the learning rate is set; stops on signals / time
            ...                                  # train_step / head_step(..., session.buckets)
            if not session.end_step(record, data_state, summary):
                break                            # a checkpoint was saved because the run must stop
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Callable, Iterator

import torch

from scimoe.checkpoint import contents, storage
from scimoe.checkpoint.async_save import AsyncSaver
from scimoe.checkpoint.storage import CheckpointSaveError, step_folders
from scimoe.config import Config, ConfigError
from scimoe.model import MoETransformer, build_model
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.parallelize import parallelize
from scimoe.parallel.runtime import make_grad_buckets, master_shards, optimizer_shards
from scimoe.parallel.state import gather_coordinates, rank_grid
from scimoe.run_dir import clear_finished, mark_finished
from scimoe.train.metrics import make_logger
from scimoe.train.master import MasterOptimizer, cast_to_bf16
from scimoe.train.optim import build_optimizer, lr_at
from scimoe.train.signals import StopRequest
from scimoe.train.step import autocast

log = logging.getLogger("scimoe")


def compute_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors, and the tensors inside the media lists (images, (series, rate) pairs), moved to `device`."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return [move(x) for x in v] if isinstance(v, list) else v
    return {k: move(v) for k, v in batch.items()}


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a GPU; the process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def materialize(model: MoETransformer, device: torch.device) -> MoETransformer:
    """Storage for a model built on the meta device (contents undefined until loaded), the buffers computed
    from the config filled in, and the tensors' attributes (megatron's and ours: which are shards) kept: moving
    off the meta device makes new tensor objects."""
    tensors = lambda: list(model.named_parameters()) + list(model.named_buffers())  # noqa: E731
    attributes = {name: dict(vars(t)) for name, t in tensors() if vars(t)}
    model.to_empty(device=device)
    for name, tensor in tensors():
        vars(tensor).update(attributes.get(name, {}))
    model.reset_computed_buffers()
    return model


def _duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Session:
    """One run of a recipe on this rank. `dims` defaults to the layout torchrun describes with `cfg.parallel`'s
    sizes; `initial_state` (a full single-process state dict) replaces the seeded initial weights."""

    def __init__(self, cfg: Config, run_dir: str, dims: ParallelDims | None = None,
                 initial_state: dict | None = None) -> None:
        self.stop = StopRequest.install(cfg.train.max_minutes, cfg.train.signal_grace_s)  # before anything slow
        try:
            self._start(cfg, run_dir, dims, initial_state)
        except BaseException:
            self.stop.close()
            raise

    def _start(self, cfg: Config, run_dir: str, dims: ParallelDims | None, initial_state: dict | None) -> None:
        self.cfg, self.run_dir, self.initial_state = cfg, run_dir, initial_state
        dims = dims or ParallelDims.from_config(cfg.parallel)
        dims.check_model(cfg.model.moe.num_experts, cfg.model.layers, cfg.model.moe.n_groups)
        dims.check_sequence(cfg.train.seq_len)
        self.dims = dims.build_groups()
        os.makedirs(run_dir, exist_ok=True)
        # an unlistable checkpoints folder stops the run here, before it touches anything
        saved = step_folders(run_dir) if cfg.checkpoint.resume in ("auto", "auto_or_fresh") else []
        source = cfg.checkpoint.init_weights.removeprefix("hf:")
        if source and not saved and not os.path.isdir(source):
            raise ConfigError(f"config error at 'checkpoint.init_weights': {source} is not a folder (a checkpoint "
                              "such as RUN/checkpoints/step_00000050, or hf:FOLDER for a Hugging Face folder)")
        coordinates = gather_coordinates(self.dims)
        if self.dims.rank == 0:
            log.info("layout %s, run dir %s", self.dims.describe(), run_dir)
            if not self.dims.is_single_process:
                log.info("%s", rank_grid(self.dims, coordinates))
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS on GPUs only
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        self.device = compute_device()
        self.model, self.chunks = self._parallel_model(initial_state)
        self.optimizer = self._optimizer()
        self.saver = AsyncSaver() if cfg.checkpoint.async_save else None
        self.logger = None
        self.start = self.reached = 0
        self.skipped_in_a_row = 0
        self.schedule_steps = cfg.train.decay_steps or cfg.train.steps
        """The learning-rate schedule's length: fixed when the run starts, kept across resumes (see _schedule)."""

    def _optimizer(self):
        """The gradient buckets (held here, handed to every step) and the optimizer: torch's AdamW (ZeRO-1 sharded)
        on fp32 weights, or fp32 masters of bf16 / offloaded weights (scimoe/train/master.py), taken before the
        weights are cast."""
        cfg, model, dims = self.cfg, self.model, self.dims
        self.buckets = make_grad_buckets(model, dims, cfg.parallel.grad_bucket_mb, cfg.parallel.overlap_grad_reduce,
                                         cfg.train.mixed,
                                         torch.bfloat16 if cfg.parallel.grad_reduce_dtype == "bf16" else torch.float32)
        if not cfg.train.mixed:
            return build_optimizer(model, cfg.train, optimizer_shards(model, dims, cfg.parallel.zero))
        optimizer = MasterOptimizer(model, cfg.train, master_shards(model, dims, cfg.parallel.zero),
                                    offload=cfg.train.optimizer_offload == "cpu")
        if cfg.train.dtype == "bf16":
            cast_to_bf16(model)
        return optimizer

    def _parallel_model(self, state: dict | None) -> tuple[MoETransformer, list]:
        """This rank's part of the model. Started from a Hugging Face folder, it is built and sharded on the meta
        device and only this rank's share is ever allocated (the weights are read in afterwards); otherwise it
        is initialised whole from the seed, as one process would, and then sharded."""
        train = self.cfg.train
        if state is None and self.cfg.checkpoint.init_weights.startswith("hf:"):
            with torch.device("meta"):
                model = build_model(self.cfg.model)
                model.set_recompute(train.recompute, train.recompute_layers)
                chunks = parallelize(model, self.dims)
            return materialize(model, self.device), chunks
        model = build_model(self.cfg.model, seed=train.seed)
        model.set_recompute(train.recompute, train.recompute_layers)
        if state is not None:
            model.load_state_dict(state)
        chunks = parallelize(model, self.dims)
        return model.to(self.device), chunks

    def starting_model(self) -> tuple[MoETransformer, list]:
        """A frozen copy of the policy as the run started (seeded, `initial_state` or checkpoint.init_weights),
        sharded like it, and its pipeline chunks: GRPO's KL reference. It reads no checkpoint of this run, so
        resuming does not move it."""
        model, chunks = self._parallel_model(self.initial_state)
        if self.cfg.checkpoint.init_weights:
            self._load_init_weights(model)
        if self.cfg.train.dtype == "bf16":
            cast_to_bf16(model)
        return model.eval().requires_grad_(False), chunks

    def _load_init_weights(self, model: MoETransformer) -> None:
        source = self.cfg.checkpoint.init_weights
        if source.startswith("hf:"):  # a Hugging Face folder, read rank by rank
            contents.load_hf_weights(source[3:], model, self.cfg.model, self.dims)
            return
        source = storage.find_resume_path(self.run_dir, source, "checkpoint.init_weights")
        contents.load_weights(source, model, self.dims)

    def resume(self) -> dict | None:
        """Continue from the checkpoint `checkpoint.resume` names (the train state it saved) or start from
        checkpoint.init_weights (None); then open the logger at the right step."""
        cfg = self.cfg
        state = None
        path = storage.find_resume_path(self.run_dir, cfg.checkpoint.resume)
        if path:
            state = contents.load(path, self.model, self.optimizer, self.dims)
            self.start = self.reached = state["step"]
            log.info("resumed from %s (step %d)", path, self.start)
            self._schedule(state)
        elif cfg.train.lr_restart_from:
            source = storage.find_resume_path(self.run_dir, cfg.train.lr_restart_from, "train.lr_restart_from")
            contents.load(source, self.model, self.optimizer, self.dims)
            log.info("train.lr_restart_from: weights and optimizer state of %s, a new %s schedule of %d steps from "
                     "step 0", source, cfg.train.schedule, self.schedule_steps)
        elif cfg.checkpoint.init_weights:
            self._load_init_weights(self.model)
            log.info("initial weights from %s", cfg.checkpoint.init_weights)
        self._check_balance_scope(state)
        self.logger = make_logger(cfg.logger, self.run_dir, self.dims.rank == 0, dataclasses.asdict(cfg),
                                  resume_step=self.start)
        if self.dims.rank == 0 and self.start < cfg.train.steps:
            clear_finished(self.run_dir)
        return state

    def _schedule(self, state: dict) -> None:
        """Keep the schedule the resumed checkpoint was trained with, unless train.decay_steps names another length;
        either way say what changed."""
        saved = state.get("schedule")
        if saved is None:  # written before schedules were saved: the configuration's, as then
            return
        train, say = self.cfg.train, (log.warning if self.dims.rank == 0 else log.debug)
        if train.decay_steps and train.decay_steps != saved["steps"]:
            say("train.decay_steps=%d: the learning-rate schedule changes from %d to %d steps at step %d",
                train.decay_steps, saved["steps"], train.decay_steps, self.start)
        elif saved["steps"] != self.schedule_steps:
            self.schedule_steps = saved["steps"]
            say("train.steps=%d, but the learning-rate schedule this run was trained with is %d steps long: it "
                "keeps that length (min_lr after it); pass train.decay_steps=N for another", train.steps, saved["steps"])
        if saved.get("name", train.schedule) != train.schedule:
            say("train.schedule changes from %s to %s at step %d", saved["name"], train.schedule, self.start)

    @property
    def balance_scope(self) -> int:
        """Sequences each balance statistic is taken over: one micro-batch of every data-parallel replica."""
        return self.cfg.train.micro_batch * self.dims.data_parallel

    def _check_balance_scope(self, state: dict | None) -> None:
        if self.dims.rank != 0:
            return
        log.info("balance statistics over train.micro_batch × dp = %d × %d = %d sequences per micro-step; "
                 "another layout reproduces this run when that product is the same", self.cfg.train.micro_batch,
                 self.dims.data_parallel, self.balance_scope)
        saved = (state or {}).get("balance_scope")
        if saved is not None and saved != self.balance_scope:
            log.warning("the resumed checkpoint took balance statistics over %d sequences, this run over %d "
                        "(train.micro_batch × dp changed): the loss continues, but not exactly as before",
                        saved, self.balance_scope)

    def steps(self) -> Iterator[int]:
        """Optimizer steps (0-based) from where the run stands to `train.steps`, the learning rate set for each.
        A stop requested before the first step (a signal during start-up) ends the run here, cleanly."""
        total = self.cfg.train.steps
        if self.start >= total:
            if self.dims.rank == 0:
                log.info("already at step %d (train.steps=%d): nothing to train; pass train.steps=%d or more to "
                         "continue", self.start, total, self.start + 1)
            return
        if self.stop.signalled(self.dims.any_rank):
            log.info("stop requested (%s) before the first step: nothing to save, exiting",
                     self.stop.reason or "another rank")
            return
        self._first_step_began = time.monotonic()
        for step in range(self.start, total):
            self.optimizer.set_lr(lr_at(step, self.cfg.train, self.schedule_steps))
            yield step

    def autocast(self):
        return autocast(self.cfg.train.dtype)

    def end_step(self, record: dict, data_state: dict | Callable[[], dict], summary: str) -> bool:
        """Log the step, enforce the skipped-steps guard, save when due; False when the run must stop now
        (a checkpoint was saved). `data_state` may be a function, asked (on every rank) only when saving."""
        cfg, step = self.cfg, record["step"]
        self.reached = step
        self.logger.log(record)
        if self.dims.rank == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            done, left = step - self.start, cfg.train.steps - step
            eta = (time.monotonic() - self._first_step_began) / done * left
            log.info("step %d/%d | %s%s | eta %s", step, cfg.train.steps, summary,
                     " | SKIPPED (non-finite)" if record.get("skipped") else "", _duration(eta))
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if record.get("skipped") else 0
        if self.skipped_in_a_row >= cfg.train.max_skipped_in_a_row:
            raise RuntimeError(f"{self.skipped_in_a_row} steps in a row had a non-finite loss or grad norm "
                               f"(train.max_skipped_in_a_row={cfg.train.max_skipped_in_a_row}); stopping. The last "
                               f"complete checkpoint is kept in {storage.checkpoint_root(self.run_dir)}")
        self._poll_async_save()
        last = step == cfg.train.steps
        stopping = self.stop.should_stop(self.dims.any_rank)
        leaving = stopping or bool(cfg.train.exit_after_steps and step - self.start >= cfg.train.exit_after_steps)
        if last or leaving or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            self.save(step, data_state() if callable(data_state) else data_state)
        if leaving and not last:
            why = f"stop requested ({self.stop.reason or 'another rank'})" if stopping else \
                f"train.exit_after_steps={cfg.train.exit_after_steps} reached"
            log.info("%s at step %d: checkpoint saved, exiting", why, step)
            return False
        return True

    def save(self, step: int, data_state: dict) -> None:
        """Checkpoint `step` (every rank); a failed save stops the run or is reported, as
        checkpoint.on_save_error says."""
        def on_complete() -> None:
            storage.prune(self.run_dir, self.cfg.checkpoint.keep_last)
            log.info("saved %s", storage.step_dir(self.run_dir, step))

        from omegaconf import OmegaConf

        self._warn_if_disk_is_short(step)
        try:
            contents.save(self.run_dir, step, self.model, self.optimizer, data_state,
                            OmegaConf.to_yaml(OmegaConf.structured(self.cfg)), self.dims, self.saver,
                            on_complete if self.dims.rank == 0 else None,
                            extra_state={"balance_scope": self.balance_scope,
                                         "schedule": {"name": self.cfg.train.schedule, "steps": self.schedule_steps}},
                            extra_files=self._tokenizer_files() if self.dims.rank == 0 else None)
        except CheckpointSaveError as err:
            self._save_failed(err)

    def _tokenizer_files(self) -> dict[str, bytes]:
        """The run's tokenizer, stored in every checkpoint so the weights never travel without it (recipes with a
        built-in task tokenizer store none)."""
        from scimoe.data.tokenizer import run_tokenizer_path, tokenizer_files

        try:
            return tokenizer_files(run_tokenizer_path(self.cfg, self.run_dir))
        except ConfigError:  # no tokenizer file of its own (e.g. GRPO's addition task builds one in memory)
            return {}

    def _poll_async_save(self) -> None:
        """A background save that failed since the last step: every rank learns it and applies the policy."""
        if self.saver is None:
            return
        err = self.saver.poll()
        if self.dims.any_rank(err is not None):
            self._save_failed(err or CheckpointSaveError("an asynchronous checkpoint save failed on another rank"))

    def _save_failed(self, err: BaseException) -> None:
        if self.cfg.checkpoint.on_save_error == "stop":
            raise err
        done = storage.complete_checkpoints(self.run_dir)
        log.error("%s; checkpoint.on_save_error=continue: training goes on, a resume now would use %s", err,
                  done[-1][1] if done else "no checkpoint (start over)")

    def _warn_if_disk_is_short(self, step: int) -> None:
        if self.dims.rank != 0:
            return
        done = storage.complete_checkpoints(self.run_dir)
        try:
            need = storage.size_bytes(done[-1][1]) if done else 0
            free = shutil.disk_usage(self.run_dir).free
        except OSError as err:
            log.warning("cannot tell whether %s has room for checkpoint %s: %s", self.run_dir, step, err)
            return
        if need and free < need:
            log.warning("checkpoint %s needs about %.2f GiB (the size of the last one) but %.2f GiB are free on %s: "
                        "the save may fail", storage.step_dir(self.run_dir, step), need / 2**30, free / 2**30,
                        self.run_dir)

    def close(self, failed: bool = False) -> None:
        """Wait for the save in flight, mark the run FINISHED when it reached `train.steps` (also when a
        resume found nothing left to do), and release the logger and signal handlers."""
        try:
            if self.saver is not None and not failed:
                try:
                    self.saver.wait()  # the last checkpoint is complete before the run reports success
                except CheckpointSaveError as err:
                    self._save_failed(err)
            if not failed and self.dims.rank == 0 and self.reached == self.cfg.train.steps:
                mark_finished(self.run_dir, self.cfg.train.steps)
        finally:
            self.stop.close()
            if self.logger is not None:
                self.logger.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(failed=kind is not None)
