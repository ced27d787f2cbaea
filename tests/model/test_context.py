"""Context parallelism's model side: the chunking and each rank's attention over the whole row's keys.
Run: `python -m pytest tests/model/test_context.py` (the multi-rank runs are in tests/distributed/test_parity.py)."""
from __future__ import annotations

import pytest
import torch

from scimoe.config import ConfigError, ParallelConfig
from scimoe.model.attention import packed_attention
from scimoe.model.documents import Documents
from scimoe.model.context import ContextDocuments, chunk_indices, document_starts, lower_right_causal, row_order
from scimoe.parallel.dims import ParallelDims


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_chunks_cover_the_row_once_and_balance_causal_work(cp):
    length = 8 * cp
    held = [chunk_indices(length, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(length))
    work = {int((h + 1).sum()) for h in held}  # keys a causal query at position i attends to: i + 1
    assert len(work) == 1, work
    order = row_order(length, cp)
    assert torch.equal(torch.cat(held)[order], torch.arange(length))


def test_a_row_that_does_not_cut_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match=r"train.seq_len \(30\).*2 × parallel.cp \(8\)"):
        chunk_indices(30, 4, 0)
    with pytest.raises(ConfigError, match=r"train.seq_len \(30\)"):
        ParallelDims(world_size=4, cp=4).check_sequence(30)
    with pytest.raises(ConfigError, match=r"train.seq_len / parallel.cp \(6\).*parallel.tp \(4\)"):
        ParallelDims(world_size=8, tp=4, cp=2, sequence_parallel=True).check_sequence(12)
    with pytest.raises(ConfigError, match="parallel.cp"):
        ParallelDims(world_size=6, tp=2, cp=2)
    with pytest.raises(ConfigError, match="parallel.cp"):
        ParallelConfig(cp=0)


def test_document_starts_follow_position_resets_and_rows():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 0, 1, 2]])  # row 2 continues a document, then a new one
    assert document_starts(positions).tolist() == [[0, 0, 0, 3, 3, 5], [0, 0, 0, 3, 3, 3]]


@pytest.mark.parametrize("cp", [2, 3])
def test_every_ranks_attention_is_the_rows_attention_with_its_gradients(cp):
    """Documents crossing chunk boundaries, a row continuing a document, GQA; in float64 the cp ranks' outputs
    and the gradients they send to q, k and v are those of the single-process packed attention."""
    torch.manual_seed(0)
    b, t, heads, kv_heads, d = 2, 12 * cp, 4, 2, 8
    lengths = [5, 3 * cp + 2, 12 * cp - 5 - (3 * cp + 2)]
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]), torch.arange(t) + 7])
    q, k, v = (torch.randn(b, t, h, d, dtype=torch.float64, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    upstream = torch.randn(b, t, heads, d, dtype=torch.float64)
    want = packed_attention(q, k, v, Documents.from_positions(positions), gqa=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), (q, k, v))

    total = 0
    for rank in range(cp):
        held = chunk_indices(t, cp, rank)
        local_k, local_v = k[:, held], v[:, held]
        whole = {id(local_k): k, id(local_v): v}  # what the cp exchange returns: the row's keys and values
        docs = ContextDocuments.build(positions, cp, rank, lambda x: whole[id(x)])
        out = docs.attend(q[:, held], local_k, local_v, gqa=True)
        assert torch.allclose(out, want[:, held], atol=1e-12), rank
        total = total + (out * upstream[:, held]).sum()
    for got, expected in zip(torch.autograd.grad(total, (q, k, v)), want_grads):
        assert torch.allclose(got, expected, atol=1e-12)


def test_a_continued_document_saves_nothing_of_size_queries_times_keys():
    """The piece that continues a document keeps q, k, v, its output and one log-sum-exp per query for the
    backward; a lower-right mask would add a [L, S] fp32 tensor."""
    q = torch.randn(4, 16, 8, requires_grad=True)
    k, v = torch.randn(2, 64, 8, requires_grad=True), torch.randn(2, 64, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = lower_right_causal(q, k, v, gqa=True)
    assert max(saved) == k.numel() and sum(saved) < 3 * k.numel() + 2 * q.numel() + 4 * 16 + 1, saved
    mask = torch.arange(64) <= torch.arange(48, 64)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(out, want, atol=1e-6)


def test_context_parallel_generation_and_grpo_are_refused_by_name():
    from scimoe.config import Config
    from scimoe.model.attention import Attention
    from scimoe.rl.grpo import _check_layout

    attention = Attention(hidden=16, heads=2, kv_heads=2, head_dim=8, eps=1e-6)
    positions = torch.arange(8)[None]
    docs = ContextDocuments.build(positions, 2, 0, lambda x: x)
    rotary = (torch.ones(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))
    with pytest.raises(ValueError, match="KV cache under context parallelism"):
        attention(torch.randn(1, 4, 16), rotary, docs, cache={})
    with pytest.raises(ConfigError, match="'parallel.cp'.*recipe=grpo"):
        _check_layout(Config(), ParallelDims(world_size=2, cp=2))
