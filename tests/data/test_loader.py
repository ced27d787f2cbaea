"""The step loader is deterministic, layout independent and resumable: `python -m pytest tests/data/test_loader.py`."""
from __future__ import annotations

import pytest
import torch

from scimoe.data.loader import StepLoader
from scimoe.data.packing import PackedRows


def _rows(n=10, seq=4):
    ids = torch.arange(n * seq).view(n, seq)
    return PackedRows(ids, torch.arange(seq).repeat(n, 1), ids + 1)


def _ids(steps):
    return [torch.cat([mb["input_ids"][:, 0] for mb in step]).tolist() for step in steps]


def test_epochs_cover_every_row_once_and_reshuffle():
    loader = StepLoader(_rows(), global_batch=5, micro_batch=5, seed=1)
    seen = _ids([loader.next_step() for _ in range(4)])
    first, second = seen[0] + seen[1], seen[2] + seen[3]
    assert sorted(first) == sorted(second) == list(range(0, 40, 4))
    assert first != second


def test_data_parallel_ranks_split_the_same_global_batch():
    single = StepLoader(_rows(), global_batch=4, micro_batch=2, seed=3)
    ranks = [StepLoader(_rows(), global_batch=4, micro_batch=1, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        whole = _ids([single.next_step()])[0]
        parts = [_ids([r.next_step()])[0] for r in ranks]
        assert parts[0] + parts[1] == whole


def test_state_dict_resumes_the_exact_sequence():
    a = StepLoader(_rows(), global_batch=3, micro_batch=1, seed=7)
    for _ in range(4):
        a.next_step()
    b = StepLoader(_rows(), global_batch=3, micro_batch=1, seed=7)
    b.load_state_dict(a.state_dict())
    assert _ids([a.next_step() for _ in range(5)]) == _ids([b.next_step() for _ in range(5)])


def test_state_from_other_data_is_refused():
    a = StepLoader(_rows(10), global_batch=2, micro_batch=1, seed=7)
    b = StepLoader(_rows(12), global_batch=2, micro_batch=1, seed=7)
    with pytest.raises(ValueError, match="data changed"):
        b.load_state_dict(a.state_dict())
