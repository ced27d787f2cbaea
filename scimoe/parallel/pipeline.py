"""Pipeline parallelism: this rank's stage of the model, run by megatron-core's 1F1B schedule.

Tested by `tests/distributed/test_parity.py` (pp2, pp2 interleaved, pp2×dp2, pp2×ep2, tp2×pp2 against one
process). With v virtual stages per rank (`parallel.pp_virtual`, megatron's interleaved schedule)
the layers split into pp·v stages and rank r runs stages r, r+pp, …; otherwise stage s keeps layers
[s·L/pp, (s+1)·L/pp) (or `parallel.pp_layers`). The first stage holds the embedding,
the last the final norm, LM head and loss; the FoPE tables are shared by every layer and so live on
every stage, with their gradients summed over the pipeline. Each MoE layer's balance and z terms are
attached to the activations (scaled by 1/micro-batches) so their gradient reaches the router through
the pipeline's backward, whichever stage the layer is on.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from scimoe.model import MoETransformer
from scimoe.parallel.dims import ParallelDims


def stage_layers(layers: int, stages: int, stage: int, split: list[int] | None = None) -> range:
    """Decoder-layer indices of (virtual) `stage`: even split, or `split` = layers per stage."""
    counts = split or [layers // stages + (1 if s < layers % stages else 0) for s in range(stages)]
    if len(counts) != stages or sum(counts) != layers or min(counts) < 1:
        raise ValueError(f"parallel.pp_layers {split} must list {stages} positive counts (pp × pp_virtual) "
                         f"summing to model.layers ({layers})")
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


class PipelineChunk(nn.Module):
    """One model chunk (virtual stage) a pipeline rank runs; megatron's schedule calls it per micro-batch.

    Chunk c of rank r is virtual stage c·pp + r. The interleaved schedule gives a rank several chunks
    that share one (stripped) model, so parameters and their names stay those of the single process.
    """

    def __init__(self, model: MoETransformer, virtual_stage: int, virtual_stages: int, layer_ids: range, config) -> None:
        from megatron.core.enums import ModelType

        super().__init__()
        self.virtual_stage, self.layer_ids = virtual_stage, layer_ids
        self.first, self.last = virtual_stage == 0, virtual_stage == virtual_stages - 1
        self.model = model
        self.config = config  # read by megatron's schedule (p2p shapes, dtype, loss convention)
        self.model_type = ModelType.encoder_or_decoder
        self.input_tensor: torch.Tensor | None = None
        self.auxes: list = []
        self.last_loss_sum = 0.0

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, mb: dict[str, torch.Tensor], label_tokens: int, aux_grad_scale: float, head=None):
        """Last stage: this micro-batch's share of the global LM loss, or `head(logits, mb)` → (loss, extras);
        others: hidden states [s, b, h]. `mb["replay"]` (per MoE layer, or None) forces experts."""
        if self.first:
            x = self.model.embed_local(mb["input_ids"], mb.get("images"), mb.get("series"))
        else:
            x = self.input_tensor.transpose(0, 1)
        x, auxes = self.model.run_layers(x, mb["positions"], self.layer_ids, mb.get("replay"),
                                         aux_grad_scale=aux_grad_scale)
        self.auxes.append(auxes)
        if self.last:
            if head is not None:
                return head(self.model.output(x, None)[0], mb)
            _, loss_sum, _ = self.model.output(x, mb["labels"])
            self.last_loss_sum += float(loss_sum.detach())
            return loss_sum / max(label_tokens, 1)
        return x.transpose(0, 1).contiguous()


def build_chunks(model: MoETransformer, dims: ParallelDims) -> list[PipelineChunk]:
    """This rank's chunks, and the model stripped to what they run (placeholders keep the names)."""
    pp, virtual, rank = dims.pp, dims.pp_virtual, dims.groups.pp_rank
    config = megatron_pipeline_config(model, dims)
    stages = pp * virtual
    split = list(dims.pp_layers) if dims.pp_layers else None
    ids = [stage_layers(len(model.layers), stages, c * pp + rank, split) for c in range(virtual)]
    keep = {i for r in ids for i in r}
    for i in range(len(model.layers)):
        if i not in keep:
            model.layers[i] = nn.Identity()
    chunks = [PipelineChunk(model, c * pp + rank, stages, ids[c], config) for c in range(virtual)]
    if not chunks[0].first:  # the embedding and the vision / time-series encoders live on the first stage
        model.embed_tokens = model.vision = model.timeseries = None
    if not chunks[-1].last:
        model.norm = model.lm_head = None
    return chunks


def megatron_pipeline_config(model: MoETransformer, dims: ParallelDims):
    """The TransformerConfig megatron's schedule reads (tensor shapes, dtype, loss convention)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg, tp, pp, virtual = model.cfg, dims.tp, dims.pp, dims.pp_virtual
    return TransformerConfig(
        num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        # Our loss is already the global-token mean: the schedule must not divide it again.
        calculate_per_token_loss=True, batch_p2p_comm=False, use_cpu_initialization=True,
        virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
        # stages then exchange [seq/tp, batch, hidden]: each tp rank its own positions
        sequence_parallel=dims.sp)


def pipeline_forward_backward(chunks: list[PipelineChunk], microbatches: list[dict[str, torch.Tensor]],
                              label_tokens: int, pp: int, head=None, aux_grad_scale: float | None = None,
                              forward_only: bool = False, no_sync=None) -> list[dict]:
    """1F1B (interleaved when a rank has several chunks) over the micro-batches; each chunk keeps its
    layers' MoE statistics per micro-batch in `auxes`, the last one its loss sum. With `head(logits, mb) ->
    (loss, extras)` the last stage's loss is the head's; returns the extras of each micro-batch on the last
    stage ([] elsewhere). Balance terms enter times `aux_grad_scale` (default 1 / micro-batches). `no_sync`: the
    gradient buckets' context for backward passes that must not start reductions (megatron's no_sync_func: all
    but each chunk's last micro-batch)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n_micro, virtual = len(microbatches), len(chunks)
    if virtual > 1 and n_micro < pp:
        raise ValueError(f"the interleaved schedule needs at least parallel.pp ({pp}) micro-batches per step, got "
                         f"{n_micro} (train.global_batch / (train.micro_batch × data-parallel size))")
    for chunk in chunks:
        chunk.auxes, chunk.last_loss_sum = [], 0.0

    scale = 1.0 / n_micro if aux_grad_scale is None else aux_grad_scale

    def forward_step(data: Iterator, model: PipelineChunk):
        mb = next(data)
        out = model(mb, label_tokens, scale, head)
        extras = {}
        if head is not None and model.last:
            out, extras = out

        def loss_func(loss: torch.Tensor):
            return loss, torch.tensor(1 if head else int((mb["labels"] != -100).sum())), extras
        return out, loss_func

    for chunk in chunks:
        chunk.config.no_sync_func = no_sync
        # the residual stream between stages has the weights' dtype (bf16 under mixed precision)
        chunk.config.pipeline_dtype = torch.bfloat16 if any(p.dtype == torch.bfloat16 for p in chunk.parameters()) \
            else torch.float32
    b, s = microbatches[0]["input_ids"].shape
    schedule = get_forward_backward_func(pp_size=pp, vp_size=virtual if virtual > 1 else None)
    return schedule(forward_step_func=forward_step, data_iterator=[iter(microbatches) for _ in chunks], model=chunks,
                    num_microbatches=n_micro, seq_length=s, micro_batch_size=b, forward_only=forward_only)
