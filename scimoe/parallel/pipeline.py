"""Pipeline parallelism: this rank's stage of the model, run by megatron-core's 1F1B schedule.

Tested by `tests/distributed/test_parity.py` (pp2, pp2×dp2, pp2×ep2 against one process). Stage s
keeps decoder layers [s·L/pp, (s+1)·L/pp) (or `parallel.pp_layers`), the first stage the embedding,
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


def stage_layers(layers: int, stages: int, stage: int, split: list[int] | None = None) -> range:
    """Decoder-layer indices of `stage`: even split, or `split` = layers per stage."""
    counts = split or [layers // stages + (1 if s < layers % stages else 0) for s in range(stages)]
    if len(counts) != stages or sum(counts) != layers or min(counts) < 1:
        raise ValueError(f"parallel.pp_layers {split} must list {stages} positive counts summing to model.layers ({layers})")
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


class PipelineStage(nn.Module):
    """The part of the model one pipeline rank runs; megatron's schedule calls it per micro-batch."""

    def __init__(self, model: MoETransformer, stage: int, stages: int, config, split: list[int] | None = None) -> None:
        super().__init__()
        self.layer_ids = stage_layers(len(model.layers), stages, stage, split)
        self.first, self.last = stage == 0, stage == stages - 1
        for i in range(len(model.layers)):
            if i not in self.layer_ids:
                model.layers[i] = nn.Identity()  # keeps the single-process parameter names
        if not self.first:
            model.embed_tokens = None
        if not self.last:
            model.norm = model.lm_head = None
        self.model = model
        from megatron.core.enums import ModelType

        self.config = config  # read by megatron's schedule (p2p shapes, dtype, loss convention)
        self.model_type = ModelType.encoder_or_decoder
        self.input_tensor: torch.Tensor | None = None
        self.auxes: list = []
        self.last_loss_sum = 0.0

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, mb: dict[str, torch.Tensor], label_tokens: int, aux_grad_scale: float) -> torch.Tensor:
        """Last stage: this micro-batch's share of the global LM loss; others: hidden states [s, b, h]."""
        if self.first:
            x = self.model.embed_tokens(mb["input_ids"])
        else:
            x = self.input_tensor.transpose(0, 1)
        x, auxes = self.model.run_layers(x, mb["positions"], self.layer_ids, aux_grad_scale=aux_grad_scale)
        self.auxes.append(auxes)
        if self.last:
            _, loss_sum, _ = self.model.output(x, mb["labels"])
            self.last_loss_sum += float(loss_sum.detach())
            return loss_sum / max(label_tokens, 1)
        return x.transpose(0, 1).contiguous()


def megatron_pipeline_config(model: MoETransformer, tp: int, pp: int):
    """The TransformerConfig megatron's schedule reads (tensor shapes, dtype, loss convention)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = model.cfg
    return TransformerConfig(
        num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        # Our loss is already the global-token mean: the schedule must not divide it again.
        calculate_per_token_loss=True, batch_p2p_comm=False, use_cpu_initialization=True)


def pipeline_forward_backward(stage: PipelineStage, microbatches: list[dict[str, torch.Tensor]],
                              label_tokens: int) -> list[list]:
    """1F1B over the micro-batches; returns per-micro-batch MoE statistics of this stage's layers."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n_micro = len(microbatches)
    stage.auxes, stage.last_loss_sum = [], 0.0

    def forward_step(data: Iterator, model: PipelineStage):
        mb = next(data)
        out = model(mb, label_tokens, 1.0 / n_micro)

        def loss_func(loss: torch.Tensor):
            return loss, torch.tensor(int((mb["labels"] != -100).sum())), {}
        return out, loss_func

    b, s = microbatches[0]["input_ids"].shape
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(microbatches), model=[stage],
                                num_microbatches=n_micro, seq_length=s, micro_batch_size=b, forward_only=False)
    return stage.auxes
