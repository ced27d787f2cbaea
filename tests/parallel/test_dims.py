"""Layout validation: `python -m pytest tests/parallel/test_dims.py`."""
from __future__ import annotations

import pytest

from scimoe.parallel.dims import ParallelDims


def test_data_parallel_is_what_tp_and_pp_leave():
    assert ParallelDims(world_size=8, tp=2, pp=2).dp == 2
    assert ParallelDims(world_size=8, tp=2, pp=2, ep=2).describe() == "TP2-PP2-EP2-DP2 rank 0"


@pytest.mark.parametrize("kw, key", [({"world_size": 6, "tp": 4}, "parallel.tp"),
                                     ({"world_size": 4, "ep": 3}, "parallel.ep"),
                                     ({"world_size": 8, "tp": 4, "etp": 2}, "parallel.etp")])
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


def test_pipeline_stages_split_layers_evenly_or_as_listed():
    from scimoe.parallel.pipeline import stage_layers

    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(4, 2, s, [1, 3])) for s in range(2)] == [[0], [1, 2, 3]]
    # interleaved: 2 ranks × 2 chunks = 4 virtual stages; rank 0 runs stages 0 and 2
    assert [list(stage_layers(8, 4, v)) for v in (0, 2)] == [[0, 1], [4, 5]]
    with pytest.raises(ValueError, match="pp_layers"):
        stage_layers(4, 2, 0, [2, 1])


def test_grouped_routing_with_ep_equal_to_groups_sends_k_over_g_copies_to_every_rank():
    import torch

    from scimoe.model.moe.router import grouped_topk

    experts, top_k, groups = 16, 8, 4
    idx = grouped_topk(torch.rand(100, experts), top_k, groups)
    owner = idx // (experts // groups)  # ep = groups: expert e lives on rank e // (E / ep)
    for rank in range(groups):
        assert torch.equal((owner == rank).sum(-1), torch.full((100,), top_k // groups))


def test_initial_weights_depend_on_the_seed_only():
    import torch

    from scimoe.config import ModelConfig
    from scimoe.model import build_model

    a = build_model(ModelConfig(), seed=7).state_dict()
    torch.manual_seed(999)
    torch.randn(1000)
    b = build_model(ModelConfig(), seed=7).state_dict()
    c = build_model(ModelConfig(), seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.mlp.router.weight"], c["layers.0.mlp.router.weight"])
