"""What the training step needs from the layout: sums over data-parallel ranks, gradient sync, the
global gradient norm, and gathering full weights. One object, passed explicitly.

`Runtime` is the single-process version (nothing to communicate); `DistributedRuntime` does expert +
data parallelism. Tested by `tests/distributed/test_parity.py` and `tests/distributed/test_grad_norm.py`.

Every loss term is a rank's share of a global-batch sum (see scimoe/model/moe/losses.py and
scimoe/train/step.py), so gradients are SUMMED, not averaged: dense ones over dp, expert ones over
expert-dp (each expert shard already got the gradient of every token of its ep group).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from scimoe.model import MoETransformer
from scimoe.parallel.deepspeed_groups import register_with_deepspeed
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.expert import TokenSplit, apply_expert_parallel, apply_expert_tensor_parallel, expert_parameters
from scimoe.parallel.pipeline import build_chunks, megatron_pipeline_config, pipeline_forward_backward
from scimoe.parallel.state import Groups
from scimoe.train.shards import Shard
from scimoe.parallel.tensor import (apply_tensor_parallel, gather_tensor_parallel, is_tensor_parallel,
                                    partial_grad_parameters)


def autocast_context(dtype: str):
    """bf16 autocast (CPU or GPU) around forward passes; fp32 runs without autocast."""
    if dtype == "bf16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Runtime:
    """Single process: every reduction is the identity."""

    dims = ParallelDims()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def prepare(self, model: MoETransformer) -> None:
        """Shard and hook a freshly initialised full model for this layout."""

    def forward_backward(self, model: MoETransformer, microbatches: list[dict[str, torch.Tensor]],
                         label_tokens: int, dtype: str = "fp32") -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
        """Forward and backward every micro-batch. Returns this rank's shares of (LM loss sum, balance,
        z) as float64 [3], and per MoE layer the expert counts and its MoEAux.layer_stats averaged over micro-batches."""
        n_micro = len(microbatches)
        totals = torch.zeros(3, dtype=torch.float64)
        counts: list[torch.Tensor] = []
        stats: list[torch.Tensor] = []
        for mb in microbatches:
            with autocast_context(dtype):
                out = model(mb["input_ids"], mb["positions"], mb["labels"], images=mb.get("images"),
                            series=mb.get("series"))
            loss = out.loss_sum / max(label_tokens, 1) + (out.balance_loss + out.z_loss) / n_micro
            loss.backward()
            totals += torch.stack([out.loss_sum.detach(), out.balance_loss.detach() / n_micro,
                                   out.z_loss.detach() / n_micro]).double().cpu()
            _accumulate_moe_stats(counts, stats, out.moe, n_micro)
        return totals, counts, stats

    def sync_grads(self, model: MoETransformer) -> None:
        pass

    def optimizer_shards(self, model: MoETransformer, zero: int) -> list | None:
        """[(params, group)] for ZeRO-1 sharding; None = one plain optimizer (nothing to shard over)."""
        return None

    def clip_grad_norm(self, model: MoETransformer, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))

    def full_state_dict(self, model: MoETransformer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    def shard_layout(self, model: MoETransformer) -> dict[str, tuple[int, int, int]]:
        """{state-dict name: (dim, index, parts)} for every tensor this rank holds only a slice of:
        slice `index` of `parts` equal slices along `dim` of the single-process tensor."""
        return {}

    def all_gather_object(self, obj) -> list:
        """`obj` from every rank of the job, in rank order."""
        return [obj]

    def barrier(self) -> None:
        pass

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank of the job."""
        return flag


def _all_reduced(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of `t` over `group`, on t's device (moved through the GPU when the backend is NCCL)."""
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else t.device
    out = t.detach().to(comm_device, copy=True)
    dist.all_reduce(out, group=group)
    return out.to(t.device)


def _accumulate_moe_stats(counts: list, stats: list, auxes: list, n_micro: int) -> None:
    if not counts:
        counts.extend(torch.zeros_like(a.counts) for a in auxes)
        stats.extend(torch.zeros(4, dtype=torch.float64) for _ in auxes)
    for i, aux in enumerate(auxes):
        counts[i] += aux.counts
        stats[i] += aux.layer_stats() / n_micro


def _all_reduce_grads(params: list[torch.nn.Parameter], group) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class DistributedRuntime(Runtime):
    """Tensor, pipeline, expert (and expert tensor, etp = tp) and data parallelism."""

    def __init__(self, dims: ParallelDims, groups: Groups, pp_layers: list[int] | None = None,
                 pp_virtual: int = 1, sequence_parallel: bool = False) -> None:
        self.dims, self.groups, self.pp_layers, self.pp_virtual = dims, groups, pp_layers, pp_virtual
        self.sequence_parallel = sequence_parallel
        self.chunks = None

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduced(t, self.groups.dp)

    def prepare(self, model: MoETransformer) -> None:
        apply_tensor_parallel(model, self.groups.tp, self.groups.tp_rank, self.dims.tp)
        apply_expert_parallel(model, self.groups.ep, self.groups.ep_rank, self.dims.ep)
        apply_expert_tensor_parallel(model, self.groups.etp, self.groups.etp_rank, self.dims.etp)
        if self.dims.ep > 1:
            register_with_deepspeed(self.dims, self.groups, expert_parameters(model))
        self.sequence_parallel = self.sequence_parallel and self.dims.tp > 1
        # With SP and etp the MoE blocks gather the sequence (each expert shard needs all the tokens of its
        # etp group) and so see the same tokens on every tp rank, like plain tp.
        self.moe_gathers_sequence = self.sequence_parallel and self.dims.etp > 1
        if self.sequence_parallel:
            shards = TokenSplit(self.groups.tp, self.groups.tp_rank, self.dims.tp, dim=1)
            model.sequence_shards = shards
            for layer in model.layers:
                layer.sequence_shards = shards
            for moe in model.moe_layers():
                if self.moe_gathers_sequence:
                    moe.sequence_gather = shards
                else:
                    moe.sequence_reduce = lambda t: _all_reduced(t, self.groups.tp)
        elif self.dims.tp > 1 and self.dims.ep > 1 and self.dims.etp == 1:  # megatron's tp×ep: tp ranks route token shares
            split = TokenSplit(self.groups.tp, self.groups.tp_rank, self.dims.tp)
            for moe in model.moe_layers():
                moe.token_split = split
        # Tokens differ across tp ranks in the MoE blocks (sequence shards or tp×ep token shares).
        self.tokens_split_over_tp = (self.sequence_parallel and not self.moe_gathers_sequence) or \
            (self.dims.tp > 1 and self.dims.ep > 1 and self.dims.etp == 1)
        stats_group = self.groups.tp_dp if self.tokens_split_over_tp else self.groups.dp
        self.stats_reduce = lambda t: _all_reduced(t, stats_group)
        self.chunks = None
        if self.dims.pp > 1:
            config = megatron_pipeline_config(model, self.dims.tp, self.dims.pp, self.pp_virtual, self.sequence_parallel)
            self.chunks = build_chunks(model, self.groups.pp_rank, self.dims.pp, self.pp_virtual, config, self.pp_layers)
        for moe in model.moe_layers():
            moe.stats_reduce = self.stats_reduce

    def forward_backward(self, model, microbatches, label_tokens, dtype="fp32"):
        b, s = microbatches[0]["input_ids"].shape
        if self.sequence_parallel and s % self.dims.tp:
            raise ValueError(f"train.seq_len ({s}) must be divisible by parallel.tp ({self.dims.tp}) with sequence parallelism")
        if self.tokens_split_over_tp and not self.sequence_parallel and b % self.dims.tp:
            raise ValueError(f"train.micro_batch ({b}) must be divisible by parallel.tp ({self.dims.tp}) when tensor "
                             "and expert parallelism are combined")
        if self.chunks is None:
            totals, counts, stats = super().forward_backward(model, microbatches, label_tokens, dtype)
            return self._sum_token_shares(totals, counts, stats)
        with autocast_context(dtype):
            pipeline_forward_backward(self.chunks, microbatches, label_tokens, self.dims.pp)
        n_micro = len(microbatches)
        totals = torch.zeros(3, dtype=torch.float64)
        per_chunk = []  # (virtual stage, counts, layer stats) of this rank's chunks
        for chunk in self.chunks:
            counts: list[torch.Tensor] = []
            stats: list[torch.Tensor] = []
            for auxes in chunk.auxes:
                _accumulate_moe_stats(counts, stats, auxes, n_micro)
                for a in auxes:
                    totals[1] += float(a.balance_loss) / n_micro
                    totals[2] += float(a.z_loss) / n_micro
            totals[0] += chunk.last_loss_sum
            counts, stats = self._sum_token_shares(None, counts, stats)[1:]
            per_chunk.append((chunk.virtual_stage, [c.cpu() for c in counts], stats))
        totals = self._sum_token_shares(totals, [], [])[0]
        totals = _all_reduced(totals, self.groups.pp)  # every stage holds its layers' terms
        everyone: list = [None] * self.dims.pp
        dist.all_gather_object(everyone, per_chunk, group=self.groups.pp)
        ordered = sorted((item for rank_chunks in everyone for item in rank_chunks), key=lambda item: item[0])
        return (totals, [c.to(microbatches[0]["input_ids"].device) for _, cs, _ in ordered for c in cs],
                [h for _, _, hs in ordered for h in hs])

    def _sum_token_shares(self, totals, counts, stats):
        """With tokens split over tp, balance/z terms and expert counts are per-share: add the shares
        (the LM loss is replicated over tp and stays as it is); entropy and bias drift are averaged."""
        if not self.tokens_split_over_tp:
            return totals, counts, stats
        if totals is not None:
            totals = torch.cat([totals[:1], _all_reduced(totals[1:], self.groups.tp)])
        counts = [_all_reduced(c, self.groups.tp) for c in counts]
        mean = torch.tensor([1.0 / self.dims.tp, 1.0, 1.0, 1.0 / self.dims.tp], dtype=torch.float64)
        stats = [_all_reduced(s, self.groups.tp) * mean for s in stats]
        return totals, counts, stats

    def _split(self, model: MoETransformer):
        """(dense, expert-sharded) parameters. Without ep the experts are replicated like dense weights,
        reduced over dp (plus tp under sequence parallelism); megatron's expert-dp group, which spans
        tp, must not be used for them."""
        experts = {id(p) for p in expert_parameters(model)} if self.dims.ep > 1 else set()
        params = list(model.parameters())
        return [p for p in params if id(p) not in experts], [p for p in params if id(p) in experts]

    def optimizer_shards(self, model: MoETransformer, zero: int) -> list | None:
        if zero == 0:
            return None
        dense, experts = self._split(model)
        return [(dense, self.groups.dp if self.dims.dp > 1 else None),
                (experts, self.groups.expert_dp if self.dims.expert_dp > 1 else None)]

    def sync_grads(self, model: MoETransformer) -> None:
        dense, experts = self._split(model)
        if self.sequence_parallel:  # every replicated weight saw only this rank's positions ...
            moe_params = {id(p) for moe in model.moe_layers() for p in moe.parameters()} \
                if self.moe_gathers_sequence else set()  # ... but MoE blocks that gathered them saw them all
            _all_reduce_grads([p for p in dense if not is_tensor_parallel(p) and id(p) not in moe_params], self.groups.tp)
        elif self.dims.tp > 1:
            _all_reduce_grads(partial_grad_parameters(model), self.groups.tp)
        if self.dims.pp > 1:  # the FoPE tables serve layers on every stage
            _all_reduce_grads(list(model.rotary.parameters()), self.groups.pp)
        if self.dims.dp > 1:
            _all_reduce_grads(dense, self.groups.dp)
        if experts and self.dims.expert_dp > 1:
            _all_reduce_grads(experts, self.groups.expert_dp)
        if self.dims.pp > 1:
            # Each stage's dp sum ran over a different flat buffer and may round the FoPE grads differently;
            # stage 0's copy keeps every stage's tables bit-identical (a checkpoint stores one copy).
            for p in model.rotary.parameters():
                if p.grad is not None:
                    dist.broadcast(p.grad, group=self.groups.pp, group_src=0)

    def clip_grad_norm(self, model: MoETransformer, max_norm: float) -> float:
        """‖g‖ over the whole model, every element counted once: replicated grads are identical on all
        ranks after sync; tensor-parallel shards are summed over tp, expert shards over ep (they are
        replicated across expert-dp), stages over pp (the shared FoPE tables counted on stage 0 only)."""
        dense, experts = self._split(model)
        if self.dims.pp > 1 and self.groups.pp_rank > 0:
            shared = {id(p) for p in model.rotary.parameters()}
            dense = [p for p in dense if id(p) not in shared]
        def sq(params) -> torch.Tensor:
            return torch.tensor(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None),
                                dtype=torch.float64)

        split_over_tp = lambda p: is_tensor_parallel(p) or getattr(p, "expert_tensor_parallel", False)  # noqa: E731
        tp_sq = sq([p for p in dense if split_over_tp(p)])  # etp shards (etp = tp) are distinct per tp rank too
        if self.dims.tp > 1:
            tp_sq = _all_reduced(tp_sq, self.groups.tp)
        expert_sq = sq(experts)
        if self.dims.ep > 1:
            expert_sq = _all_reduced(expert_sq, self.groups.ep)
        if experts and self.dims.etp > 1:
            expert_sq = _all_reduced(expert_sq, self.groups.etp)
        stage_sq = sq([p for p in dense if not split_over_tp(p)]) + tp_sq + expert_sq
        if self.dims.pp > 1:
            stage_sq = _all_reduced(stage_sq, self.groups.pp)
        total = float(torch.sqrt(stage_sq))
        if max_norm > 0 and math.isfinite(total):
            coef = min(1.0, max_norm / (total + 1e-6))
            if coef < 1.0:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return total

    def full_state_dict(self, model: MoETransformer) -> dict[str, torch.Tensor]:
        """The single-process state dict: TP shards gathered over tp, expert shards over ep, stages over pp."""
        state = super().full_state_dict(model)
        if self.dims.tp > 1:
            state = gather_tensor_parallel(model, state, self.groups.tp, self.dims.tp)
        if self.dims.etp > 1:  # each rank holds an F/etp slice of every expert: gate and up halves, down columns
            for name in [k for k in state if k.endswith(("gate_up_proj", "down_proj")) and ".experts." in k]:
                parts = [torch.empty_like(state[name]) for _ in range(self.dims.etp)]
                dist.all_gather(parts, state[name].contiguous(), group=self.groups.etp)
                if name.endswith("down_proj"):
                    state[name] = torch.cat(parts, dim=2)
                else:
                    halves = [p.chunk(2, dim=1) for p in parts]
                    state[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)
        if self.dims.ep > 1:
            for name in [k for k in state if k.endswith(("gate_up_proj", "down_proj")) and ".experts." in k]:
                parts = [torch.empty_like(state[name]) for _ in range(self.dims.ep)]
                dist.all_gather(parts, state[name].contiguous(), group=self.groups.ep)
                state[name] = torch.cat(parts)
        if self.dims.pp > 1:
            stages: list = [None] * self.dims.pp
            dist.all_gather_object(stages, state, group=self.groups.pp)
            state = {k: v for stage_state in stages for k, v in stage_state.items()}
        return state

    def shard_layout(self, model: MoETransformer) -> dict:
        """TP shards (megatron's `partition_dim`) are slice tp_rank of tp; expert weights slice ep_rank of ep
        along the expert axis and, under etp, slice etp_rank of their hidden width (gate_up: of its gate and
        of its up half). Pipeline stages keep the single-process names, so need no entry."""
        layout = {name: Shard(((p.partition_dim, self.groups.tp_rank, self.dims.tp),))
                  for name, p in model.named_parameters() if is_tensor_parallel(p)}
        experts = {id(p) for p in expert_parameters(model)}
        for name, p in model.named_parameters():
            if id(p) not in experts or (self.dims.ep == 1 and self.dims.etp == 1):
                continue
            splits = [(0, self.groups.ep_rank, self.dims.ep)] if self.dims.ep > 1 else []
            glu = name.endswith("gate_up_proj")
            if self.dims.etp > 1:
                splits.append((1 if glu else 2, self.groups.etp_rank, self.dims.etp))
            layout[name] = Shard(tuple(splits), glu_dim=1 if glu and self.dims.etp > 1 else None)
        return layout

    def all_gather_object(self, obj) -> list:
        out: list = [None] * self.dims.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        return bool(_all_reduced(torch.tensor(int(flag)), dist.group.WORLD))


def make_runtime(dims: ParallelDims, groups: Groups, pp_layers: list[int] | None = None,
                 pp_virtual: int = 1, sequence_parallel: bool = False) -> Runtime:
    if dims.is_single_process:
        return Runtime()
    return DistributedRuntime(dims, groups, pp_layers, pp_virtual, sequence_parallel)
