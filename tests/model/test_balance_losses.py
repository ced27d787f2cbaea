"""Each balance term against a hand computation: `python -m pytest tests/model/test_balance_losses.py`."""
from __future__ import annotations

import math

import pytest
import torch

from scimoe.model.moe import losses
from scimoe.model.moe.router import grouped_topk

# 4 tokens (2 sequences of 2), 4 experts in 2 groups, top-2 (one per group).
LOGITS = torch.tensor([[2.0, 0.0, 1.0, -1.0],
                       [0.5, 1.5, -0.5, 0.0],
                       [1.0, 0.0, 0.0, 2.0],
                       [3.0, -2.0, 0.5, 0.4]])
PROBS = LOGITS.softmax(-1)
IDX = grouped_topk(PROBS, top_k=2, n_groups=2)


def test_fixture_routing_is_the_one_computed_by_hand():
    assert IDX.tolist() == [[0, 2], [1, 3], [0, 3], [0, 2]]


def test_aux_loss_matches_hand_computation():
    t, e, k = 4, 4, 2
    counts = [sum(int(i in row) for row in IDX.tolist()) for i in range(e)]  # [3, 1, 2, 2]
    mean_p = [sum(PROBS[tok, i].item() for tok in range(t)) / t for i in range(e)]
    expected = e / (k * t) * sum(c * p for c, p in zip(counts, mean_p))
    assert losses.aux_loss(PROBS, IDX, top_k=k).item() == pytest.approx(expected, rel=1e-6)


def test_sequence_aux_loss_matches_hand_computation():
    e, k, s = 4, 2, 2
    per_seq = []
    for b in range(2):
        toks = range(b * s, (b + 1) * s)
        counts = [sum(int(i in IDX[tok].tolist()) for tok in toks) for i in range(e)]
        mean_p = [sum(PROBS[tok, i].item() for tok in toks) / s for i in range(e)]
        per_seq.append(e / (k * s) * sum(c * p for c, p in zip(counts, mean_p)))
    expected = sum(per_seq) / 2
    assert losses.sequence_aux_loss(PROBS, IDX, top_k=k, batch=2).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_matches_hand_computation():
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS.tolist()) / 4
    assert losses.z_loss(LOGITS).item() == pytest.approx(expected, rel=1e-6)


def test_group_balance_loss_matches_hand_computation():
    t, per_group, k_group = 4, 2, 1
    group_losses = []
    for g in range(2):
        experts = [2 * g, 2 * g + 1]
        renorm = [[PROBS[tok, i].item() / sum(PROBS[tok, j].item() for j in experts) for i in experts] for tok in range(t)]
        counts = [sum(int(i in IDX[tok].tolist()) for tok in range(t)) for i in experts]
        mean_p = [sum(renorm[tok][n] for tok in range(t)) / t for n in range(2)]
        group_losses.append(per_group / (k_group * t) * sum(c * p for c, p in zip(counts, mean_p)))
    expected = sum(group_losses) / 2
    assert losses.group_balance_loss(PROBS, IDX, top_k=2, n_groups=2).item() == pytest.approx(expected, rel=1e-6)


def _routed(probs: torch.Tensor) -> torch.Tensor:
    return losses.group_balance_loss(probs, grouped_topk(probs, 2, 2), top_k=2, n_groups=2)


def test_group_balance_loss_is_minimal_for_a_balanced_assignment():
    # Inside each group, tokens alternate their preferred expert: perfectly balanced.
    balanced = torch.tensor([[0.3, 0.2, 0.3, 0.2], [0.2, 0.3, 0.2, 0.3]] * 4)
    assert _routed(balanced).item() == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(0)
    for _ in range(20):
        skewed = torch.rand(8, 4) * 0.2 + torch.tensor([0.6, 0.0, 0.6, 0.0])  # everyone prefers experts 0 and 2
        skewed = skewed / skewed.sum(-1, keepdim=True)
        assert _routed(skewed).item() > _routed(balanced).item()


def test_aux_free_bias_moves_toward_underloaded_experts():
    bias = torch.zeros(4)
    losses.aux_free_bias_update(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), rate=0.01)
    assert torch.allclose(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_selection_bias_changes_choice_but_not_weights():
    from scimoe.model.moe.router import GroupedRouter

    router = GroupedRouter(4, 4, 2, 2, "sparse")
    router.weight.data = torch.eye(4)
    x = torch.tensor([[1.0, 0.9, 1.0, 0.9]])
    before = router(x)
    router.selection_bias.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    after = router(x)
    assert before.indices.tolist() == [[0, 2]] and after.indices.tolist() == [[1, 3]]
    p = after.probs[0]
    assert torch.allclose(after.weights[0], torch.stack([p[1], p[3]]) / (p[1] + p[3]))
