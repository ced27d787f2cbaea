"""Tensor parallelism with megatron-core's layers, applied to a built single-process model.

Tested by `tests/distributed/test_parity.py` (tp2 and tp2×dp2 against one process). Following
torchtitan's pattern, the full model is initialised as on one process and then sharded: q/k/v and the
LM head become ColumnParallelLinear (heads / vocabulary split), o_proj RowParallelLinear, the token
embedding VocabParallelEmbedding, the LM loss megatron's vocab_parallel_cross_entropy, and FoPE's
per-KV-head tables keep the local heads. With `parallel.etp=1` the MoE blocks stay whole on every
tensor-parallel rank (their input is the replicated residual stream, so they compute the same values and
gradients on each rank); with `parallel.etp` = tp each expert's hidden width is split over the tp ranks
instead (scimoe/parallel/expert.py: gate/up column-parallel, down row-parallel).
"""
from __future__ import annotations

import torch
from torch import nn

from scimoe.model import MoETransformer
from scimoe.model.communication import LocalText
from scimoe.model.rotary import FoPE
from scimoe.parallel.comm_ops import TokenSplit
from scimoe.parallel.dims import ParallelDims

def _megatron_classes():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class Column(ColumnParallelLinear):
        """ColumnParallelLinear that returns only its output, like nn.Linear."""

        def forward(self, x):  # noqa: D102
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        """RowParallelLinear that returns only its output, like nn.Linear."""

        def forward(self, x):  # noqa: D102
            return super().forward(x)[0]

    return Column, Row, VocabParallelEmbedding


def _model_parallel_config(tp: int):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=torch.float32)


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return full.detach().chunk(size, dim=dim)[rank].clone()


def _replace(parent: nn.Module, name: str, new: nn.Module, full_weight: torch.Tensor, dim: int, rank: int,
             size: int) -> None:
    with torch.no_grad():
        new.weight.copy_(_shard(full_weight, dim, rank, size))
    # megatron sets these only when it initialises the weight itself; we copy ours in instead.
    new.weight.tensor_model_parallel, new.weight.partition_dim = True, dim
    setattr(parent, name, new)


def apply_tensor_parallel(model: MoETransformer, dims: ParallelDims) -> None:
    """Shard attention, embedding and LM head over the tensor-parallel group, in place."""
    tp_size, tp_group, tp_rank = dims.tp, dims.groups.tp, dims.groups.tp_rank
    if tp_size == 1:
        return
    cfg = model.cfg
    if cfg.heads % tp_size or cfg.kv_heads % tp_size or cfg.vocab_size % tp_size:
        raise ValueError(f"parallel.tp ({tp_size}) must divide model.heads ({cfg.heads}), model.kv_heads "
                         f"({cfg.kv_heads}) and model.vocab_size ({cfg.vocab_size})")
    Column, Row, VocabEmbedding = _megatron_classes()
    mp = _model_parallel_config(tp_size)
    init = lambda w: None  # noqa: E731  (weights are copied from the full model below)
    h, hd = cfg.hidden, cfg.head_dim
    for layer in model.layers:
        attn = layer.self_attn
        for name, width in (("q_proj", cfg.heads * hd), ("k_proj", cfg.kv_heads * hd), ("v_proj", cfg.kv_heads * hd)):
            new = Column(h, width, config=mp, init_method=init, bias=False, gather_output=False, tp_group=tp_group)
            _replace(attn, name, new, getattr(attn, name).weight, 0, tp_rank, tp_size)
        new = Row(cfg.heads * hd, h, config=mp, init_method=init, bias=False, input_is_parallel=True,
                  skip_bias_add=False, tp_group=tp_group)
        _replace(attn, "o_proj", new, attn.o_proj.weight, 1, tp_rank, tp_size)
        attn.heads, attn.kv_heads = cfg.heads // tp_size, cfg.kv_heads // tp_size
    embed = VocabEmbedding(cfg.vocab_size, h, init_method=init, config=mp, tp_group=tp_group)
    _replace(model, "embed_tokens", embed, model.embed_tokens.weight, 0, tp_rank, tp_size)
    head = Column(h, cfg.vocab_size, config=mp, init_method=init, bias=False, gather_output=False, tp_group=tp_group)
    _replace(model, "lm_head", head, model.lm_head.weight, 0, tp_rank, tp_size)
    if isinstance(model.rotary, FoPE) and model.rotary.cos_coef.shape[0] > 1:
        for name in ("cos_coef", "sin_coef"):  # per-KV-head tables follow their heads (buffers or trained)
            full = getattr(model.rotary, name)
            local = _shard(full, 0, tp_rank, tp_size)
            if isinstance(full, nn.Parameter):
                local = nn.Parameter(local)
                setattr(model.rotary, name, local)
            else:
                model.rotary.register_buffer(name, local)
            local.tensor_model_parallel, local.partition_dim = True, 0


class TensorParallelText(LocalText):
    """The transformer's communication under tp (scimoe/model/communication.py's TextCommunication): sequence
    shards of the residual stream with sequence parallelism, megatron's vocab-parallel cross-entropy."""

    def __init__(self, dims: ParallelDims) -> None:
        self.shards = TokenSplit(dims.groups.tp, dims.groups.tp_rank, dims.tp, dim=1) if dims.sp else None
        self.vocab_parallel = dims.tp > 1
        self.group, self.parts = dims.groups.tp, dims.tp

    def split_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return self.shards.split(x) if self.shards else x

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return self.shards.gather(x) if self.shards else x

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.vocab_parallel:
            return super().loss_sum(logits, labels)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        mask = labels != -100
        return (vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~mask, 0)) * mask).sum()

    def target_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.vocab_parallel:
            return super().target_logprobs(logits, targets)
        import torch.distributed as dist
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logp = -vocab_parallel_cross_entropy(logits.float().clone(), targets)  # megatron shifts its input in place
        with torch.no_grad():  # H = lse − Σ p·z over the shards
            z = logits.float()
            top = z.max(-1, keepdim=True).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
            total = (z - top).exp().sum(-1, keepdim=True)
            dist.all_reduce(total, group=self.group)
            lse = top + total.log()
            weighted = ((z - lse).exp() * z).sum(-1)
            dist.all_reduce(weighted, group=self.group)
        return logp, lse.squeeze(-1) - weighted

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.vocab_parallel:
            return logits
        from scimoe.parallel.comm_ops import gather_along

        return gather_along(logits.contiguous(), self.group, self.parts, logits.dim() - 1)


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """True for a tensor-parallel shard (megatron's attribute, also set on our FoPE shards)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def tensor_parallel_tensors(model: MoETransformer) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of every tensor-parallel shard, parameters and buffers (FoPE tables) alike."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [(name, t) for name, t in tensors if is_tensor_parallel(t)]


def partial_grad_parameters(model: MoETransformer, dims: ParallelDims) -> list[nn.Parameter]:
    """Replicated weights whose gradient each TP rank sees only in part: the q/k norms (shared by all
    heads, each rank holds some heads), a single shared FoPE table, and the routers when tp ranks split
    the tokens for expert parallelism. Their grads are summed over tp."""
    attns = [layer.self_attn for layer in model.layers if hasattr(layer, "self_attn")]  # pipeline placeholders skipped
    params = [p for attn in attns for p in (attn.q_norm.weight, attn.k_norm.weight)]
    if isinstance(model.rotary, FoPE) and not is_tensor_parallel(model.rotary.cos_coef):
        params += [t for t in (model.rotary.cos_coef, model.rotary.sin_coef) if isinstance(t, nn.Parameter)]
    # With tp × ep each tp rank routes its own share of the tokens: router grads are per-share too.
    if dims.routes_token_shares:
        params += [moe.router.weight for moe in model.moe_layers()]
    return params


def gather_tensor_parallel(model: MoETransformer, state: dict[str, torch.Tensor], dims: ParallelDims) -> dict[str, torch.Tensor]:
    """Turn this rank's state dict into the single-process one by all-gathering every TP shard."""
    import torch.distributed as dist

    for name, param in tensor_parallel_tensors(model):
        parts = [torch.empty_like(param) for _ in range(dims.tp)]
        dist.all_gather(parts, param.detach().contiguous(), group=dims.groups.tp)
        state[name] = torch.cat(parts, dim=param.partition_dim)
    return state
