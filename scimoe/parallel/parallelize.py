"""`parallelize`: turn a model built and initialised as on one process into this rank's part of a layout.

Used by every recipe through scimoe/train/session.py; tested by `python -m pytest tests/distributed`
(every layout reproduces the single process). Like torchtitan's `parallelize_*` functions it applies the
dimensions in one fixed order, each step reading only the model and the layout object:

1. tensor parallel: attention, embedding and LM head become megatron-core's parallel layers (tensor.py);
2. expert parallel, then expert tensor parallel: each rank keeps its experts and its slice of their
   hidden width; DeepSpeed's MoE registry gets the same groups (expert.py, deepspeed_groups.py);
3. sequence parallel and every exchange the model makes: one communication object for the transformer
   and one per MoE block (tensor.py's TensorParallelText, expert.py's ParallelMoE), and with context
   parallelism the row chunks and the key/value exchange of attention (context.py);
4. activation recomputation is chosen on the model before this runs (`MoETransformer.set_recompute`,
   scimoe/model/recompute.py): it wraps blocks in torch.utils.checkpoint, so the exchanges installed above
   rerun with them;
5. pipeline parallel: the model is stripped to this rank's stages, driven by megatron's schedule (pipeline.py);
6. data parallel: gradients are summed after the backward and AdamW state is sharded ZeRO-1 style
   (runtime.py's sync_grads and optimizer_shards, called by the step and the session).
"""
from __future__ import annotations

from scimoe.model import MoETransformer
from scimoe.parallel.deepspeed_groups import register_with_deepspeed
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.expert import ParallelMoE, apply_expert_parallel, apply_expert_tensor_parallel, expert_parameters
from scimoe.parallel.pipeline import PipelineChunk, build_chunks
from scimoe.parallel.tensor import TensorParallelText, apply_tensor_parallel


def parallelize(model: MoETransformer, dims: ParallelDims) -> list[PipelineChunk]:
    """Shard `model` in place for `dims` (whose groups are built); returns this rank's pipeline chunks
    ([] without pipeline parallelism)."""
    if dims.is_single_process:
        return []
    if (model.vision or model.timeseries) and dims.sp:
        raise NotImplementedError("vision / time-series encoders with parallel.sequence_parallel are not built yet "
                                  "(the encoders' replicated gradients would be summed over tp)")
    apply_tensor_parallel(model, dims)
    apply_expert_parallel(model, dims)
    apply_expert_tensor_parallel(model, dims)
    if dims.ep > 1:
        register_with_deepspeed(dims, expert_parameters(model))
    install_communication(model, dims)
    if dims.cp > 1:
        from scimoe.parallel.context import ParallelContext

        model.context = ParallelContext(dims)
    return build_chunks(model, dims) if dims.pp > 1 else []


def install_communication(model: MoETransformer, dims: ParallelDims) -> None:
    """The transformer's and every MoE block's communication for `dims` (generation swaps in the layout without
    sequence parallelism and back)."""
    model.use_communication(TensorParallelText(dims), lambda moe: ParallelMoE(dims, moe.cfg.num_experts))
