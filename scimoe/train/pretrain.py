"""Pretraining recipe: next-token prediction on a data source, with checkpoints and metrics.

Run: `scimoe-train model=tiny train.steps=50 hydra.run.dir=outputs/tiny` (≡ `python -m scimoe.train ...`).
Reads top to bottom: layout → model → data → optimizer → resume → loop → final save.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import os
import time

import torch

from omegaconf import OmegaConf

from scimoe.config import Config
from scimoe.data.loader import StepLoader
from scimoe.data.sources import build_rows
from scimoe.launch.hardware import peak_tflops
from scimoe.launch.run_dir import clear_finished, mark_finished
from scimoe.model import build_model
from scimoe.model.counting import training_flops_per_token
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.runtime import make_runtime
from scimoe.parallel.state import dims_from_env, gather_coordinates, init_process_groups, rank_grid
from scimoe.train import checkpoint
from scimoe.train.async_save import AsyncSaver
from scimoe.train.metrics import make_logger, moe_health
from scimoe.train.optim import build_optimizer, lr_at
from scimoe.train.signals import StopRequest
from scimoe.train.step import train_step

log = logging.getLogger("scimoe")


@dataclass
class PretrainResult:
    """What a pretraining call produced on this process."""

    records: list[dict]
    """The per-step metrics (the same on every rank)."""
    final_weights: dict | None = None
    """The full single-process state dict after training (gathered over ranks), when asked for."""
    optimizer_state_numel: int = 0
    """Elements of optimizer state held by this rank (ZeRO-1 shards it)."""


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


def modality_tokens(batches: list[dict], model_cfg, runtime) -> dict[str, int]:
    """Input tokens of the step by modality, summed over data-parallel ranks (padding counts as text)."""
    ids = torch.cat([mb["input_ids"].flatten() for mb in batches])
    image, ts = int((ids == model_cfg.image_token_id).sum()), int((ids == model_cfg.ts_token_id).sum())
    counts = runtime.reduce_sum(torch.tensor([ids.numel() - image - ts, image, ts]))
    return dict(zip(("text", "image", "time_series"), (int(c) for c in counts)))


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a GPU; the process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def pretrain(cfg: Config, run_dir: str, dims: ParallelDims | None = None, initial_state: dict | None = None,
             gather_final_weights: bool = False) -> PretrainResult:
    """Train to `cfg.train.steps`, resuming if asked.

    `dims` defaults to the layout torchrun describes (WORLD_SIZE, RANK) with `cfg.parallel`'s sizes;
    `initial_state` (a full single-process state dict) replaces the seeded initial weights.
    """
    dims = dims or dims_from_env(cfg.parallel)
    os.makedirs(run_dir, exist_ok=True)
    dims.check_model(cfg.model.moe.num_experts, cfg.model.layers, cfg.model.moe.n_groups)
    groups = init_process_groups(dims)
    runtime = make_runtime(dims, groups, cfg.parallel.pp_layers, cfg.parallel.pp_virtual,
                           cfg.parallel.sequence_parallel)
    coordinates = gather_coordinates(dims, groups)
    if dims.rank == 0:
        log.info("layout %s, run dir %s", dims.describe(), run_dir)
        if not dims.is_single_process:
            log.info("%s", rank_grid(dims, coordinates))

    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS on GPUs only
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    model = build_model(cfg.model, seed=cfg.train.seed)
    if (model.vision or model.timeseries) and cfg.parallel.sequence_parallel and dims.tp > 1:
        raise NotImplementedError("vision / time-series encoders with parallel.sequence_parallel are not built yet "
                                  "(the encoders' replicated gradients would be summed over tp)")
    if initial_state is not None:
        model.load_state_dict(initial_state)
    runtime.prepare(model)  # shard experts, hook statistics reductions
    device = compute_device()
    model.to(device)
    rows = build_rows(cfg, run_dir)
    dp_rank = runtime.groups.dp_rank if not dims.is_single_process else 0
    loader = StepLoader(rows, cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seed, dp_rank, dims.dp)
    optimizer = build_optimizer(model, cfg.train, runtime.optimizer_shards(model, cfg.parallel.zero))
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))

    flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
    start = 0
    resume_path = checkpoint.find_resume_path(run_dir, cfg.checkpoint.resume)
    if resume_path:
        state = checkpoint.load(resume_path, model, optimizer, runtime, dims.rank, dims.world_size)
        loader.load_state_dict(state["loader"])
        start = state["step"]
        log.info("resumed from %s (step %d)", resume_path, start)
    elif cfg.checkpoint.init_weights:
        source = checkpoint.find_resume_path(run_dir, cfg.checkpoint.init_weights, "checkpoint.init_weights")
        checkpoint.load_weights(source, model, runtime)
        log.info("initial weights from %s", cfg.checkpoint.init_weights)
    logger = make_logger(cfg.logger, run_dir, dims.rank == 0, dataclasses.asdict(cfg), resume_step=start)

    if dims.rank == 0 and start < cfg.train.steps:
        clear_finished(run_dir)
    records: list[dict] = []
    skipped_in_a_row = 0
    stop = StopRequest(cfg.train.max_minutes)
    saver = AsyncSaver() if cfg.checkpoint.async_save else None
    try:
        for step in range(start, cfg.train.steps):
            began = time.perf_counter()
            lr = lr_at(step, cfg.train)
            optimizer.set_lr(lr)
            batches = [to_device(mb, device) for mb in loader.next_step()]
            data_time = time.perf_counter() - began
            result = train_step(model, optimizer, batches, cfg.train.grad_clip, cfg.train.dtype, runtime)
            elapsed = time.perf_counter() - began
            record = {
                "step": step + 1, "loss": result.loss, "lm_loss": result.lm_loss,
                "balance_loss": result.balance_loss, "z_loss": result.z_loss, "grad_norm": result.grad_norm,
                "lr": lr, "tokens": result.tokens, "tokens_per_s": result.tokens / elapsed,
                "mfu": flops_per_token * result.tokens / elapsed / (dims.world_size * peak_tflops(cfg.cluster) * 1e12),
                "memory_gib": memory_gib(device), "data_time_share": data_time / elapsed,
                "tokens_by_modality": modality_tokens(batches, cfg.model, runtime),
                "skipped": int(result.skipped), "moe": moe_health(result.expert_counts, result.layer_stats),
            }
            logger.log(record)
            records.append(record)
            if dims.rank == 0 and ((step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps):
                log.info("step %d | loss %.4f | lm %.4f | bal %.4f | gnorm %.3f | lr %.2e | %.0f tok/s%s",
                         step + 1, result.loss, result.lm_loss, result.balance_loss, result.grad_norm, lr,
                         record["tokens_per_s"], " | SKIPPED (non-finite)" if result.skipped else "")
            skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
            if skipped_in_a_row >= cfg.train.max_skipped_in_a_row:
                raise RuntimeError(f"{skipped_in_a_row} steps in a row had a non-finite loss or grad norm "
                                   f"(train.max_skipped_in_a_row={cfg.train.max_skipped_in_a_row}); stopping. "
                                   f"The last complete checkpoint is kept in {checkpoint.checkpoint_root(run_dir)}")
            last = step + 1 == cfg.train.steps
            stopping = stop.should_stop(runtime.any_rank)
            leaving = stopping or (cfg.train.exit_after_steps and step + 1 - start >= cfg.train.exit_after_steps)
            if last or leaving or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                def on_complete(step=step + 1) -> None:
                    checkpoint.prune(run_dir, cfg.checkpoint.keep_last)
                    log.info("saved %s", checkpoint.step_dir(run_dir, step))

                checkpoint.save(run_dir, step + 1, model, optimizer, loader.state_dict(), config_yaml, runtime,
                                dims.rank, dims.world_size, saver, on_complete if dims.rank == 0 else None)
            if leaving and not last:
                why = f"stop requested ({stop.reason or 'another rank'})" if stopping else \
                    f"train.exit_after_steps={cfg.train.exit_after_steps} reached"
                log.info("%s at step %d: checkpoint saved, exiting", why, step + 1)
                break
        if saver is not None:
            saver.wait()  # the last checkpoint is complete before the run reports success
        if dims.rank == 0 and records and records[-1]["step"] == cfg.train.steps:
            mark_finished(run_dir, cfg.train.steps)
    finally:
        stop.close()
        logger.close()
    final = runtime.full_state_dict(model) if gather_final_weights else None
    state_numel = sum(t.numel() for _, st in optimizer.parameter_states() for t in st.values() if t.dim() > 0)
    return PretrainResult(records=records, final_weights=final, optimizer_state_numel=state_numel)
