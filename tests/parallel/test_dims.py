"""Layout validation: `python -m pytest tests/parallel/test_dims.py`."""
from __future__ import annotations

import pytest

from scimoe.parallel.dims import ParallelDims


def test_data_parallel_is_what_tp_and_pp_leave():
    assert ParallelDims(world_size=8, tp=2, pp=2).dp == 2
    assert ParallelDims(world_size=8, tp=2, pp=2, ep=2).describe() == "TP2-PP2-EP2-DP2 rank 0"


@pytest.mark.parametrize("kw, key", [({"world_size": 6, "tp": 4}, "parallel.tp"),
                                     ({"world_size": 4, "ep": 3}, "parallel.ep")])
def test_world_size_must_fit_the_layout(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ParallelDims(**kw)


def test_model_checks_name_the_offending_key():
    dims = ParallelDims(world_size=4, ep=4)
    with pytest.raises(ValueError, match=r"num_experts"):
        dims.check_model(num_experts=6, layers=4, n_groups=1)
    with pytest.raises(ValueError, match=r"n_groups"):
        ParallelDims(world_size=6, ep=3).check_model(num_experts=12, layers=4, n_groups=4)
    with pytest.raises(ValueError, match=r"model\.layers"):
        ParallelDims(world_size=4, pp=4).check_model(num_experts=8, layers=2, n_groups=1)
