"""Expert parallelism: experts sharded over the ep group, dropless all-to-all dispatch and combine.

Tested by `tests/distributed/test_parity.py` (layouts ep2, ep4, ep2×dp2 against one process) and
the dispatch launch in the same file (skewed routing, a rank that receives no token). Token counts are
exchanged first, then token rows with uneven splits through the autograd-aware all_to_all_single.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from scimoe.model import MoETransformer
from scimoe.model.moe.dispatch import Dispatched, LocalDispatcher, weighted_sum_by_token
from scimoe.parallel.comm_ops import CopyToGroup, SumOverGroup, TokenSplit
from scimoe.parallel.dims import ParallelDims


@dataclass
class ExpertParallelDispatched(Dispatched):
    """Rows received for this rank's experts, plus what is needed to send results back."""

    perm: torch.Tensor = None  # received-row index of each local-expert-sorted row
    send_splits: list[int] = None
    recv_splits: list[int] = None


class ExpertParallelDispatcher:
    """Global expert e lives on ep rank e // (E / ep); each rank runs its E/ep experts on all tokens
    routed to them from the whole ep group."""

    def __init__(self, num_experts: int, group, ep_rank: int, ep_size: int) -> None:
        self.num_experts, self.group, self.ep_rank, self.ep_size = num_experts, group, ep_rank, ep_size
        self.local = num_experts // ep_size

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> ExpertParallelDispatched:
        flat = indices.flatten()
        order = torch.argsort(flat, stable=True)  # by global expert, hence by destination rank
        send_counts = torch.bincount(flat, minlength=self.num_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [source rank, local expert]
        recv_counts = recv_counts.view(self.ep_size, self.local)
        send_splits = send_counts.view(self.ep_size, self.local).sum(-1).tolist()
        recv_splits = recv_counts.sum(-1).tolist()
        rows = x[order // indices.shape[1]]
        received = all_to_all_single(rows.new_empty(sum(recv_splits), x.shape[-1]), rows,
                                     recv_splits, send_splits, group=self.group)
        local_ids = torch.repeat_interleave(torch.arange(self.local, device=x.device).repeat(self.ep_size),
                                            recv_counts.flatten())
        perm = torch.argsort(local_ids, stable=True)
        return ExpertParallelDispatched(
            x=received[perm], counts=recv_counts.sum(0), expert_ids=local_ids[perm] + self.ep_rank * self.local,
            order=order, perm=perm, send_splits=send_splits, recv_splits=recv_splits)

    def combine(self, out: torch.Tensor, weights: torch.Tensor, sent: ExpertParallelDispatched) -> torch.Tensor:
        back = torch.empty_like(out).index_copy(0, sent.perm, out)  # to received order
        returned = all_to_all_single(out.new_empty(sum(sent.send_splits), out.shape[-1]), back,
                                     sent.send_splits, sent.recv_splits, group=self.group)
        return weighted_sum_by_token(returned, weights, sent.order)


def apply_expert_parallel(model: MoETransformer, dims: ParallelDims) -> None:
    """Keep this rank's slice of every MoE layer's experts (global expert e lives on ep rank e // (E / ep))."""
    if dims.ep == 1:
        return
    for moe in model.moe_layers():
        experts = moe.experts
        local = experts.num_experts // dims.ep
        keep = slice(dims.groups.ep_rank * local, (dims.groups.ep_rank + 1) * local)
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach()[keep].clone())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.detach()[keep].clone())
        experts.num_experts = local


def apply_expert_tensor_parallel(model: MoETransformer, dims: ParallelDims) -> None:
    """Split every expert's hidden width F over the etp ranks: gate and up rows (column-parallel), down's
    columns (row-parallel); ParallelMoE sums the partial outputs over the group before the combine."""
    if dims.etp == 1:
        return
    rank = dims.groups.etp_rank
    for moe in model.moe_layers():
        experts = moe.experts
        f = experts.down_proj.shape[2]
        if f % dims.etp:
            raise ValueError(f"model.moe.ffn_hidden ({f}) must be divisible by parallel.etp ({dims.etp})")
        part = slice(rank * f // dims.etp, (rank + 1) * f // dims.etp)
        gate, up = experts.gate_up_proj.detach().split(f, dim=1)
        experts.gate_up_proj = torch.nn.Parameter(torch.cat([gate[:, part], up[:, part]], dim=1).clone())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.detach()[:, :, part].clone())
        for p in experts.parameters():
            p.expert_tensor_parallel = True


class ParallelMoE:
    """An MoE block's communication in a parallel layout (scimoe/model/communication.py's MoECommunication):
    sequence gather (SP with etp), token shares (tp × ep), expert-parallel all-to-all, expert-tensor-parallel
    copy / sum, and the sums of the balance statistics over every rank holding distinct tokens."""

    def __init__(self, dims: ParallelDims, num_experts: int) -> None:
        g = self.groups = dims.groups
        self.dims = dims
        self.dispatcher = ExpertParallelDispatcher(num_experts, g.ep, g.ep_rank, dims.ep) if dims.ep > 1 \
            else LocalDispatcher(num_experts)
        self.sequence = TokenSplit(g.tp, g.tp_rank, dims.tp, dim=1) if dims.moe_gathers_sequence else None
        self.share = TokenSplit(g.tp, g.tp_rank, dims.tp) if dims.routes_token_shares else None
        self.share_parts = dims.tp if self.share else 1
        self.stats_group = "tp_dp" if dims.tokens_split_over_tp else "dp"
        # Sequence shards without the gather, context chunks: per-sequence statistics are summed over the ranks
        # holding the sequence's other positions.
        self.sharded_sequence = dims.sp and not dims.moe_gathers_sequence
        self.sequence_group = ("tp_cp" if self.sharded_sequence else "cp") if dims.cp > 1 \
            else ("tp" if self.sharded_sequence else None)

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequence.gather(x) if self.sequence else x

    def split_sequence(self, y: torch.Tensor) -> torch.Tensor:
        return self.sequence.split(y) if self.sequence else y

    def own_share(self, tokens: torch.Tensor, replay: torch.Tensor | None):
        if replay is not None:
            if self.dims.cp > 1:
                raise ValueError(f"router replay under context parallelism is not built (parallel.cp={self.dims.cp})")
            if self.sharded_sequence:  # this rank holds positions [r·S/tp, (r+1)·S/tp) of each sequence
                replay = replay.chunk(self.dims.tp, dim=1)[self.groups.tp_rank]
            replay = replay.reshape(-1, replay.shape[-1])
        if self.share is None:
            return tokens, replay
        return self.share.split(tokens), (self.share.split(replay) if replay is not None else None)

    def all_shares(self, y: torch.Tensor) -> torch.Tensor:
        return self.share.gather(y) if self.share else y

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> Dispatched:
        sent = self.dispatcher.dispatch(x, indices)
        if self.dims.etp > 1:  # each etp rank's shard gives part of dL/dx: summed in the backward
            sent.x = CopyToGroup.apply(sent.x, self.groups.etp)
        return sent

    def expert_outputs(self, out: torch.Tensor) -> torch.Tensor:
        # the hidden-width shards' partial outputs add up to the experts' outputs
        return SumOverGroup.apply(out, self.groups.etp) if self.dims.etp > 1 else out

    def combine(self, out: torch.Tensor, weights: torch.Tensor, sent: Dispatched) -> torch.Tensor:
        return self.dispatcher.combine(out, weights, sent)

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        return self.dims.reduce_sum(t, over=self.stats_group)

    def reduce_sequence_stats(self, t: torch.Tensor) -> torch.Tensor:
        return self.dims.reduce_sum(t, over=self.sequence_group) if self.sequence_group else t


def expert_parameters(model: MoETransformer) -> list[torch.nn.Parameter]:
    """Parameters sharded over ep (reduced over expert-dp); everything else is dense (reduced over dp)."""
    return [p for moe in model.moe_layers() for p in moe.experts.parameters()]
