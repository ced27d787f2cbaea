"""ParallelDims: the run's layout (tp, pp, cp, ep, etp, dp, sequence parallelism, pipeline split), its checks,
and, once built, its process groups: the one layout object every part of a run takes.

Tested by `python -m pytest tests/parallel/test_dims.py` (and by every multi-rank test through it).
Data parallel is what the world size leaves after tp·pp; context parallelism (cp) splits each data-parallel
replica's rows over cp of those ranks, which otherwise act as data-parallel ones (their gradients, token counts
and balance statistics are summed with the others: `groups.dp` spans them, like megatron's dp-cp group);
expert parallel divides the data-parallel ranks (Megatron's expert grid). `dims.build_groups()` starts torch.distributed and megatron-core's groups
(scimoe/parallel/state.py); the collectives below (`reduce_sum`, `any_rank`, …) are the identity on one
process, so callers never branch on the layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from scimoe.config import ConfigError
from scimoe.parallel.state import Groups


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of every parallel dimension for one run, this process's global rank, and its groups."""

    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    """Context-parallel size: ranks that each hold 1/cp of every row (scimoe/model/context.py)."""
    sequence_parallel: bool = False
    """Requested; takes effect only with tp > 1 (see `sp`)."""
    pp_virtual: int = 1
    """Model chunks per pipeline rank (megatron's interleaved schedule when > 1)."""
    pp_layers: tuple[int, ...] | None = None
    """Decoder layers per (virtual) stage; None = even split."""
    collective_timeout_s: float = 600.0
    """Timeout of every process group this layout creates (parallel.collective_timeout_s)."""
    groups: Groups = field(default_factory=Groups, compare=False, repr=False)
    """The process groups this rank belongs to (empty until `build_groups`, and on one process)."""

    def __post_init__(self) -> None:
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size % model_parallel:
            raise ConfigError(f"world size {self.world_size} is not divisible by parallel.tp × parallel.pp × "
                             f"parallel.cp ({self.tp} × {self.pp} × {self.cp})")
        if self.etp not in (1, self.tp):
            raise ConfigError(f"parallel.etp ({self.etp}) must be 1 or equal parallel.tp ({self.tp}): each expert is "
                             "split over the ranks that already share its tokens")
        expert_grid = self.ep * self.etp * self.pp
        if self.world_size % expert_grid:
            raise ConfigError(f"world size {self.world_size} is not divisible by parallel.ep × parallel.etp × "
                             f"parallel.pp ({self.ep} × {self.etp} × {self.pp})")

    @classmethod
    def from_config(cls, parallel, world_size: int | None = None, rank: int | None = None) -> "ParallelDims":
        """The layout `parallel.*` asks for, on torchrun's (or a bare srun's) WORLD_SIZE / RANK unless given."""
        if world_size is None or rank is None:
            from scimoe.parallel.launcher_env import apply_launcher_env

            apply_launcher_env()
            world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        return cls(world_size=world_size, rank=rank, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, etp=parallel.etp,
                   cp=parallel.cp, sequence_parallel=parallel.sequence_parallel, pp_virtual=parallel.pp_virtual,
                   pp_layers=tuple(parallel.pp_layers) if parallel.pp_layers else None,
                   collective_timeout_s=parallel.collective_timeout_s)

    def build_groups(self) -> "ParallelDims":
        """This layout with its process groups (torch.distributed and megatron-core started as needed)."""
        if self.is_single_process or self.groups.tp is not None:
            return self
        from scimoe.parallel.state import create_groups

        return replace(self, groups=create_groups(self))

    @property
    def dp(self) -> int:
        """Ranks holding replicas of the dense weights and distinct tokens (data × context parallel)."""
        return self.world_size // (self.tp * self.pp)

    @property
    def data_parallel(self) -> int:
        """Data-parallel size proper: replicas that read different rows (dp / cp)."""
        return self.dp // self.cp

    def context_share(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's positions of whole rows `t` [B, T, …] (all of them without context parallelism)."""
        if self.cp == 1:
            return t
        from scimoe.model.context import chunk_indices

        return t.index_select(1, chunk_indices(t.shape[1], self.cp, self.groups.cp_rank, t.device))

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard (megatron's expert-data-parallel size)."""
        return self.world_size // (self.ep * self.etp * self.pp)

    @property
    def is_single_process(self) -> bool:
        return self.world_size == 1

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect: the residual stream holds seq/tp positions per tp rank."""
        return self.sequence_parallel and self.tp > 1

    @property
    def moe_gathers_sequence(self) -> bool:
        """With SP and etp the MoE blocks gather the sequence (each expert shard needs every token of its etp
        group) and so see the same tokens on every tp rank, like plain tp."""
        return self.sp and self.etp > 1

    @property
    def moe_tokens(self) -> str:
        """What the MoE blocks of the tp ranks hold: `whole` (the same tokens on every tp rank: no tp, plain tp,
        or SP with etp, which gathers the sequence), `sequence` (SP: each its seq/tp positions) or `shares`
        (megatron's tp × ep without SP: the tokens are replicated, each tp rank routes its 1/tp share)."""
        if self.sp:
            return "whole" if self.moe_gathers_sequence else "sequence"
        return "shares" if self.tp > 1 and self.ep > 1 and self.etp == 1 else "whole"

    @property
    def routes_token_shares(self) -> bool:
        """megatron's tp × ep layout: tp ranks hold the same tokens, so each routes and dispatches its 1/tp share."""
        return self.moe_tokens == "shares"

    @property
    def tokens_split_over_tp(self) -> bool:
        """The MoE blocks of the tp ranks hold different tokens (sequence shards or token shares)."""
        return self.moe_tokens != "whole"

    @property
    def routed_fraction(self) -> float:
        """The share of a micro-batch's tokens this rank's MoE blocks route (before expert parallelism)."""
        return 1 / self.tp if self.tokens_split_over_tp else 1.0

    @property
    def held_fraction(self) -> float:
        """The share of a micro-batch's positions (of this rank's context chunks) the residual stream keeps."""
        return 1 / self.tp if self.sp else 1.0

    def check_model(self, num_experts: int, layers: int, n_groups: int) -> None:
        """Layout checks that need the model's shape."""
        if num_experts % self.ep:
            raise ConfigError(f"model.moe.num_experts ({num_experts}) is not divisible by parallel.ep ({self.ep})")
        if layers < self.pp * self.pp_virtual:
            raise ConfigError(f"model.layers ({layers}) is fewer than the pipeline stages (parallel.pp × "
                             f"parallel.pp_virtual = {self.pp * self.pp_virtual})")
        if self.ep > 1 and n_groups > 1 and n_groups % self.ep and self.ep % n_groups:
            raise ConfigError(f"model.moe.n_groups ({n_groups}) and parallel.ep ({self.ep}) must divide one "
                             "another so that router groups map onto expert-parallel ranks")

    def check_sequence(self, seq_len: int) -> None:
        """Row-length checks of the layout: sequence shards and context chunks must be whole."""
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ConfigError(f"train.seq_len ({seq_len}) must be divisible by 2 × parallel.cp ({2 * self.cp}): "
                              "context parallelism cuts each row into 2·cp equal chunks")
        if self.sp and (seq_len // self.cp) % self.tp:
            raise ConfigError(f"train.seq_len / parallel.cp ({seq_len // self.cp}) must be divisible by parallel.tp "
                              f"({self.tp}) with sequence parallelism")

    def describe(self) -> str:
        cp = f"-CP{self.cp}" if self.cp > 1 else ""
        return f"TP{self.tp}-PP{self.pp}{cp}-EP{self.ep}-DP{self.data_parallel} rank {self.rank}"

    # Collectives over the job's groups; the identity on one process.

    def reduce_sum(self, t: torch.Tensor, over: str = "dp") -> torch.Tensor:
        """Sum of `t` over group `over` (dp, tp, pp, cp, tp_cp, tp_dp, ep, etp, expert_dp or world), on t's device."""
        group = self._group(over)
        if group is None:
            return t
        import torch.distributed as dist

        comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else t.device
        out = t.detach().to(comm_device, copy=True)
        dist.all_reduce(out, group=group)
        return out.to(t.device)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank of the job."""
        return bool(self.reduce_sum(torch.tensor(int(flag)), over="world"))

    def all_gather_object(self, obj, over: str = "world") -> list:
        """`obj` from every rank of group `over`, in rank order."""
        group = self._group(over)
        if group is None:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def barrier(self) -> None:
        if not self.is_single_process:
            import torch.distributed as dist

            dist.barrier()

    def _group(self, name: str):
        if self.is_single_process:
            return None
        if name == "world":
            import torch.distributed as dist

            return dist.group.WORLD
        return getattr(self.groups, name)
