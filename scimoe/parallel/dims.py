"""ParallelDims: the run's layout (tp, pp, ep, etp, dp) and its checks, passed explicitly everywhere.

Tested by `python -m pytest tests/parallel/test_dims.py`. Data parallel is what the world size leaves
after tp·pp; expert parallel divides the data-parallel ranks (Megatron's expert grid).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of every parallel dimension for one run, and this process's global rank."""

    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1

    def __post_init__(self) -> None:
        model_parallel = self.tp * self.pp
        if self.world_size % model_parallel:
            raise ValueError(f"world size {self.world_size} is not divisible by parallel.tp × parallel.pp "
                             f"({self.tp} × {self.pp})")
        if self.etp not in (1, self.tp):
            raise ValueError(f"parallel.etp ({self.etp}) must be 1 or equal parallel.tp ({self.tp}): each expert is "
                             "split over the ranks that already share its tokens")
        expert_grid = self.ep * self.etp * self.pp
        if self.world_size % expert_grid:
            raise ValueError(f"world size {self.world_size} is not divisible by parallel.ep × parallel.etp × "
                             f"parallel.pp ({self.ep} × {self.etp} × {self.pp})")

    @property
    def dp(self) -> int:
        """Data-parallel size (replicas of the dense weights)."""
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard (megatron's expert-data-parallel size)."""
        return self.world_size // (self.ep * self.etp * self.pp)

    @property
    def is_single_process(self) -> bool:
        return self.world_size == 1

    def check_model(self, num_experts: int, layers: int, n_groups: int) -> None:
        """Layout checks that need the model's shape."""
        if num_experts % self.ep:
            raise ValueError(f"model.moe.num_experts ({num_experts}) is not divisible by parallel.ep ({self.ep})")
        if layers < self.pp:
            raise ValueError(f"model.layers ({layers}) is fewer than parallel.pp stages ({self.pp})")
        if self.ep > 1 and n_groups > 1 and n_groups % self.ep and self.ep % n_groups:
            raise ValueError(f"model.moe.n_groups ({n_groups}) and parallel.ep ({self.ep}) must divide one "
                             "another so that router groups map onto expert-parallel ranks")

    def describe(self) -> str:
        return f"TP{self.tp}-PP{self.pp}-EP{self.ep}-DP{self.dp} rank {self.rank}"
