"""One optimizer step: forward and backward over the micro-batches (plain or through the pipeline schedule),
the loss formula, gradient sync and clipping, the loss guard, and the update.

Tested by `python -m pytest tests/train tests/distributed`. The LM loss is the mean over every label token of
the global batch (each micro-batch contributes its token sum / global token count), so the result does not
depend on how the batch is cut into micro-batches or ranks; balance terms are averaged over micro-batches.
Each rank's loss is its share of the global one: gradients and logged values are summed over data-parallel
ranks (scimoe/parallel/runtime.py).

Balance statistics (expert counts, mean probabilities) are taken per micro-step over every rank's micro-batch
together, i.e. over train.micro_batch × dp sequences: two layouts compute the same loss when that product
is the same (the session logs it, and warns when a resumed run changes it).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from scimoe.model import MoETransformer
from scimoe.model.moe.layer import MoEAux, stats_over_ranks
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.pipeline import PipelineChunk, pipeline_forward_backward
from scimoe.parallel.runtime import clip_grad_norm, sync_grads

_SINGLE = ParallelDims()


def autocast(dtype: str):
    """bf16 autocast (CPU or GPU) around forward passes; fp32 runs without autocast."""
    if dtype == "bf16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    """What one optimizer step measured (all Python numbers)."""

    loss: float
    lm_loss: float
    balance_loss: float
    z_loss: float
    grad_norm: float
    tokens: int
    skipped: bool
    expert_counts: list[torch.Tensor] = field(default_factory=list)
    layer_stats: list[torch.Tensor] = field(default_factory=list)
    """Per MoE layer, float64 [router entropy, balance loss, z-loss, bias drift] (MoEAux.layer_stats)."""


def _accumulate_moe_stats(counts: list, stats: list, auxes: list[MoEAux], n_micro: int) -> None:
    if not counts:
        counts.extend(torch.zeros_like(a.counts) for a in auxes)
        stats.extend(torch.zeros(4, dtype=torch.float64) for _ in auxes)
    for i, aux in enumerate(auxes):
        counts[i] += aux.counts
        stats[i] += aux.layer_stats() / n_micro


def _sum_token_shares(dims: ParallelDims, totals, counts, stats):
    """With tokens split over tp, balance/z terms and expert counts are per-share: add the shares (the LM
    loss is replicated over tp and stays as it is); entropy and bias drift are averaged."""
    if not dims.tokens_split_over_tp:
        return totals, counts, stats
    if totals is not None:
        totals = torch.cat([totals[:1], dims.reduce_sum(totals[1:], over="tp")])
    counts = [dims.reduce_sum(c, over="tp") for c in counts]
    stats = [stats_over_ranks(dims.reduce_sum(s, over="tp"), dims.tp) for s in stats]
    return totals, counts, stats


def forward_backward(model: MoETransformer, chunks: list[PipelineChunk], microbatches: list[dict],
                     label_tokens: int, dims: ParallelDims = _SINGLE, dtype: str = "fp32", buckets=None):
    """Forward and backward every micro-batch. Returns this rank's shares of (LM loss sum, balance, z) as
    float64 [3], and per MoE layer (in model order) the expert counts and MoEAux.layer_stats averaged over
    micro-batches."""
    b, s = microbatches[0]["input_ids"].shape
    dims.check_sequence(s)
    if dims.routes_token_shares and b % dims.tp:
        raise ValueError(f"train.micro_batch ({b}) must be divisible by parallel.tp ({dims.tp}) when tensor "
                         "and expert parallelism are combined")
    n_micro = len(microbatches)
    totals = torch.zeros(3, dtype=torch.float64)
    if not chunks:
        counts: list[torch.Tensor] = []
        stats: list[torch.Tensor] = []
        for i, mb in enumerate(microbatches):
            with autocast(dtype):
                out = model(mb["input_ids"], mb["positions"], mb["labels"], images=mb.get("images"),
                            series=mb.get("series"))
            loss = out.loss_sum / max(label_tokens, 1) + (out.balance_loss + out.z_loss) / n_micro
            with buckets.syncing() if buckets is not None and i == n_micro - 1 else contextlib.nullcontext():
                loss.backward()
            totals += torch.stack([out.loss_sum.detach(), out.balance_loss.detach() / n_micro,
                                   out.z_loss.detach() / n_micro]).double().cpu()
            _accumulate_moe_stats(counts, stats, out.moe, n_micro)
        return _sum_token_shares(dims, totals, counts, stats)
    with autocast(dtype):
        pipeline_forward_backward(chunks, microbatches, label_tokens, dims.pp,
                                  no_sync=buckets.no_sync if buckets is not None else None)
    per_chunk = []  # (virtual stage, counts, layer stats) of this rank's chunks
    for chunk in chunks:
        counts, stats = [], []
        for auxes in chunk.auxes:
            _accumulate_moe_stats(counts, stats, auxes, n_micro)
            for a in auxes:
                totals[1] += float(a.balance_loss) / n_micro
                totals[2] += float(a.z_loss) / n_micro
        totals[0] += chunk.last_loss_sum
        counts, stats = _sum_token_shares(dims, None, counts, stats)[1:]
        per_chunk.append((chunk.virtual_stage, [c.cpu() for c in counts], stats))
    totals = _sum_token_shares(dims, totals, [], [])[0]
    totals = dims.reduce_sum(totals, over="pp")  # every stage holds its layers' terms
    ordered = sorted((item for rank_chunks in dims.all_gather_object(per_chunk, over="pp") for item in rank_chunks),
                     key=lambda item: item[0])
    device = microbatches[0]["input_ids"].device
    return totals, [c.to(device) for _, cs, _ in ordered for c in cs], [h for _, _, hs in ordered for h in hs]


def forward_with_head(model: MoETransformer, chunks: list[PipelineChunk], batch: dict, head, dims: ParallelDims = _SINGLE,
                      dtype: str = "fp32", aux_scale: float = 1.0, backward: bool = True,
                      buckets=None) -> tuple[dict, list[MoEAux]]:
    """One forward (and backward) of `batch` whose loss is `head(logits, batch) -> (loss, extras)`, computed
    from the last stage's (vocabulary-sharded) logits; each MoE layer's balance and z terms enter times
    `aux_scale`. Returns the head's extras on every rank and this rank's MoE layers' aux outputs. The loop
    over micro-batches of a recipe whose loss is not the LM loss (GRPO)."""
    if not chunks:
        with autocast(dtype):
            out = model(batch["input_ids"], batch["positions"], replay=batch.get("replay"))
        loss, extras = head(out.logits, batch)
        if backward:  # the step's only backward: gradient buckets start as they fill
            with buckets.syncing() if buckets is not None else contextlib.nullcontext():
                (loss + (out.balance_loss + out.z_loss) * aux_scale).backward()
        return extras, out.moe
    with autocast(dtype):
        store = pipeline_forward_backward(chunks, [batch], 1, dims.pp, head=head, aux_grad_scale=aux_scale,
                                          forward_only=not backward,
                                          no_sync=buckets.no_sync if backward and buckets is not None else None)
    last = (dims.pp * dims.pp_virtual - 1) % dims.pp
    extras = dims.all_gather_object(store[0] if store else None, over="pp")[last]
    return extras, [a for chunk in chunks for auxes in chunk.auxes for a in auxes]


@dataclass
class HeadStepResult:
    """One optimizer step of a loss computed by a head on the logits (GRPO's policy loss)."""

    extras: dict
    """The head's extras (its loss and statistics; the same on every rank)."""
    loss: float
    """The global loss: every data-parallel rank's head loss times its share, plus the balance and z terms."""
    grad_norm: float
    skipped: bool
    routing_mismatch: float
    """Router-replay mismatch averaged over this replica's MoE layers (0 without replay)."""


def head_step(model: MoETransformer, optimizer, batch: dict, head, share: torch.Tensor | float, grad_clip: float,
              dims: ParallelDims = _SINGLE, dtype: str = "fp32", chunks: list[PipelineChunk] | None = None,
              buckets=None) -> HeadStepResult:
    """Forward and backward `batch` under `head` (whose loss is this rank's part, `share` of the global one), then
    sync, clip and step as train_step does: the update of a recipe whose loss is not the LM loss."""
    model.train()
    extras, auxes = forward_with_head(model, chunks or [], batch, head, dims, dtype, aux_scale=1 / dims.dp,
                                      buckets=buckets)
    aux = dims.reduce_sum(torch.tensor(sum(float((a.balance_loss + a.z_loss).detach()) for a in auxes),
                                       dtype=torch.float64), over="pp")
    loss = float(dims.reduce_sum((float(extras["loss"]) * share + aux / dims.dp).double().reshape(1)))
    grad_norm, skipped = apply_update(model, optimizer, dims, grad_clip, loss, buckets)
    mismatch = dims.reduce_sum(torch.tensor([sum(a.replay_mismatch or 0.0 for a in auxes), len(auxes)],
                                            dtype=torch.float64), over="pp")
    return HeadStepResult(extras, loss, grad_norm, skipped, float(mismatch[0] / mismatch[1].clamp_min(1)))


def apply_update(model: MoETransformer, optimizer, dims: ParallelDims, grad_clip: float, loss: float,
                 buckets=None) -> tuple[float, bool]:
    """After the backward: sync and clip gradients, then the loss guard: step (and commit the MoE layers'
    per-step state) unless `loss` (already the same on every rank) or the global grad norm is not finite.
    Returns (grad norm, skipped)."""
    sync_grads(model, dims, buckets)
    grad_norm = clip_grad_norm(model, dims, grad_clip, buckets)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    for moe in model.moe_layers():
        moe.discard_step() if skipped else moe.commit_step()
    optimizer.zero_grad()
    if buckets is not None:
        buckets.zero()
    return grad_norm, skipped


def train_step(model: MoETransformer, optimizer, microbatches: list[dict[str, torch.Tensor]], grad_clip: float,
               dtype: str = "fp32", dims: ParallelDims = _SINGLE, chunks: list[PipelineChunk] | None = None,
               buckets=None) -> StepResult:
    """Forward/backward every micro-batch, sync and clip gradients, and step unless non-finite (`buckets`: the
    session's data-parallel gradient buckets, scimoe/parallel/grad_buckets.py)."""
    model.train()
    local_labels = sum(int((dims.context_share(mb["labels"]) != -100).sum()) for mb in microbatches)
    label_tokens = int(dims.reduce_sum(torch.tensor(local_labels)))
    totals, counts, stats = forward_backward(model, chunks or [], microbatches, label_tokens, dims, dtype, buckets)
    lm_sum, balance, z = dims.reduce_sum(totals).tolist()
    lm_loss = lm_sum / max(label_tokens, 1)
    total = lm_loss + balance + z
    grad_norm, skipped = apply_update(model, optimizer, dims, grad_clip, total, buckets)
    counts = [dims.reduce_sum(c) for c in counts]
    stats = [stats_over_ranks(dims.reduce_sum(s), dims.dp) for s in stats]  # over dp (× cp) ranks
    tokens = int(dims.reduce_sum(torch.tensor(sum(dims.context_share(mb["input_ids"]).numel() for mb in microbatches))))
    return StepResult(loss=total, lm_loss=lm_loss, balance_loss=balance, z_loss=z, grad_norm=grad_norm,
                      tokens=tokens, skipped=skipped, expert_counts=counts, layer_stats=stats)
