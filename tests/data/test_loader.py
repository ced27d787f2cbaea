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


def test_data_parallel_micro_batches_partition_the_single_process_ones():
    single = StepLoader(_rows(), global_batch=8, micro_batch=4, seed=3)
    ranks = [StepLoader(_rows(), global_batch=8, micro_batch=2, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_step()
        parts = [r.next_step() for r in ranks]
        assert len(whole) == len(parts[0]) == 2
        for m, micro in enumerate(whole):
            joined = torch.cat([parts[0][m]["input_ids"], parts[1][m]["input_ids"]])
            assert torch.equal(joined, micro["input_ids"])


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
