"""Deterministic, resumable step loader: global batches from a seeded per-epoch permutation.

Tested by `python -m pytest tests/data/test_loader.py`. The global cursor does not depend on the
layout, so every data-parallel size sees the same global batch at the same step. The batch is cut into
chunks of micro_batch·dp rows; micro-batch m of rank r is the r-th slice of chunk m. So the union over
ranks of their m-th micro-batches is the single-process m-th micro-batch when that one is dp times
larger, and batch statistics (balance losses) agree across layouts.
"""
from __future__ import annotations

import torch

from scimoe.data.packing import PackedRows


class StepLoader:
    """Yields, per optimizer step, this rank's micro-batches of the global batch."""

    def __init__(self, rows: PackedRows, global_batch: int, micro_batch: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"train.global_batch ({global_batch}) must be divisible by train.micro_batch × "
                             f"data-parallel size ({micro_batch} × {dp_size})")
        self.rows, self.global_batch, self.micro_batch, self.seed = rows, global_batch, micro_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch))

    def _next_global_indices(self) -> torch.Tensor:
        picked = []
        for _ in range(self.global_batch):
            if self.cursor == len(self.rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            picked.append(self._perm[self.cursor])
            self.cursor += 1
        return torch.stack(picked)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step."""
        indices = self._next_global_indices()
        chunks = indices.split(self.micro_batch * self.dp_size)
        start = self.dp_rank * self.micro_batch
        return [self.rows.rows(chunk[start:start + self.micro_batch]) for chunk in chunks]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["rows"] != len(self.rows) or state["seed"] != self.seed:
            raise ValueError(f"data loader state was saved for {state['rows']} rows / seed {state['seed']}, "
                             f"but this run has {len(self.rows)} rows / seed {self.seed}: the data changed")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)

    def close(self) -> None:
        """Nothing to release: the rows are in memory."""
