"""Pretraining recipe (and SFT, which is the same loop on chat rows): next-token prediction on a data source.

Run: `scimoe-train model=tiny train.steps=50 hydra.run.dir=outputs/tiny` (≡ `python -m scimoe.train ...`),
under torchrun: `torchrun --nproc_per_node=4 -m scimoe.train parallel.ep=2`. Tested by
`python -m pytest tests/train/test_pretrain.py tests/distributed`. Reads top to bottom: session (layout,
model, optimizer) → data → resume → per step: batches → train_step → metrics → end_step (checkpoint, stop).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from scimoe.config import Config
from scimoe.data.sources import data_source, open_loader
from scimoe.hardware import peak_tflops
from scimoe.model.counting import training_flops_per_token
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.runtime import full_state_dict
from scimoe.train.metrics import moe_health
from scimoe.train.session import Session, memory_gib, to_device
from scimoe.train.step import train_step


@dataclass
class PretrainResult:
    """What a pretraining call produced on this process."""

    records: list[dict]
    """The per-step metrics (the same on every rank)."""
    final_weights: dict | None = None
    """The full single-process state dict after training (gathered over ranks), when asked for."""
    optimizer_state_numel: int = 0
    """Elements of optimizer state held by this rank (ZeRO-1 shards it)."""


def modality_tokens(batches: list[dict], model_cfg, dims: ParallelDims) -> dict[str, int]:
    """Input tokens of the step by modality, summed over data-parallel ranks (padding counts as text; so does a
    placeholder id when its encoder is off, since the model then reads it as a word)."""
    ids = torch.cat([dims.context_share(mb["input_ids"]).flatten() for mb in batches])
    image = int((ids == model_cfg.image_token_id).sum()) if model_cfg.vision.enabled else 0
    ts = int((ids == model_cfg.ts_token_id).sum()) if model_cfg.timeseries.enabled else 0
    counts = dims.reduce_sum(torch.tensor([ids.numel() - image - ts, image, ts]))
    return dict(zip(("text", "image", "time_series"), (int(c) for c in counts)))


def pretrain(cfg: Config, run_dir: str, dims: ParallelDims | None = None, initial_state: dict | None = None,
             gather_final_weights: bool = False) -> PretrainResult:
    """Train to `cfg.train.steps`, resuming if asked (see Session for `dims` and `initial_state`)."""
    records: list[dict] = []
    source = data_source(cfg)  # a data.source that does not exist is refused before any work
    with Session(cfg, run_dir, dims, initial_state) as session:
        dims, model = session.dims, session.model
        loader = open_loader(cfg, run_dir, dims, source)
        state = session.resume()
        if state is not None:
            loader.load_state_dict(state["loader"])
        flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
        peak = dims.world_size * peak_tflops(cfg.cluster) * 1e12
        try:
            for step in session.steps():
                began = time.perf_counter()
                batches = [to_device(mb, session.device) for mb in loader.next_step()]
                data_time = time.perf_counter() - began
                result = train_step(model, session.optimizer, batches, cfg.train.grad_clip, cfg.train.dtype, dims,
                                    session.chunks, session.buckets)
                elapsed = time.perf_counter() - began
                record = {
                    "step": step + 1, "loss": result.loss, "lm_loss": result.lm_loss,
                    "balance_loss": result.balance_loss, "z_loss": result.z_loss, "grad_norm": result.grad_norm,
                    "lr": session.optimizer.lr, "tokens": result.tokens, "tokens_per_s": result.tokens / elapsed,
                    "mfu": flops_per_token * result.tokens / elapsed / peak,
                    "memory_gib": memory_gib(session.device), "data_time_share": data_time / elapsed,
                    "tokens_by_modality": modality_tokens(batches, cfg.model, dims),
                    "skipped": int(result.skipped), "moe": moe_health(result.expert_counts, result.layer_stats),
                }
                records.append(record)
                summary = (f"loss {result.loss:.4f} | lm {result.lm_loss:.4f} | bal {result.balance_loss:.4f} | "
                           f"gnorm {result.grad_norm:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s")
                if not session.end_step(record, loader.state_dict, summary):
                    break
        finally:
            loader.close()
    final = full_state_dict(model, dims) if gather_final_weights else None
    state_numel = sum(t.numel() for _, st in session.optimizer.parameter_states() for t in st.values() if t.dim() > 0)
    return PretrainResult(records=records, final_weights=final, optimizer_state_numel=state_numel)
