"""Packed documents never see each other, and no [T, T] mask is built: `python -m pytest tests/model/test_attention.py`."""
from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

from scimoe.config import ModelConfig, MoEConfig
from scimoe.model import build_model
from scimoe.model.attention import Attention, packed_attention
from scimoe.model.documents import Documents, document_causal_mask


def test_documents_are_cumulative_lengths_over_the_flattened_batch():
    docs = Documents.from_positions(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]]))
    # A row boundary ends a document even when the next row continues one (position 3 starts row 2).
    assert docs.bounds == (0, 3, 5, 7, 10) and docs.longest == 3
    assert docs.cu.dtype == torch.int32 and docs.cu.tolist() == list(docs.bounds)
    assert Documents.from_positions(torch.tensor([[0, 1, 2], [5, 6, 7]])) is None  # one document per row


def test_dense_reference_mask_is_causal_and_blocks_other_documents():
    mask = document_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]).bool()
    assert torch.equal(mask, expected)


def test_packed_attention_matches_the_dense_mask_in_outputs_and_gradients():
    torch.manual_seed(0)
    lengths = [[37, 1, 90, 16], [64, 80]]  # mixed, incl. a one-token document; rows of 144 tokens
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    q = torch.randn(2, 144, 4, 16, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(2, 144, 2, 16).requires_grad_()
    v = torch.randn(2, 144, 2, 16).requires_grad_()
    weight = torch.randn(2, 144, 4, 16)
    new = packed_attention(q, k, v, Documents.from_positions(positions), gqa=True)
    grads_new = torch.autograd.grad((new * weight).sum(), (q, k, v))
    old = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=document_causal_mask(positions), enable_gqa=True).transpose(1, 2)
    grads_old = torch.autograd.grad((old * weight).sum(), (q, k, v))
    assert (new - old).abs().max() <= 1e-5
    for a, b in zip(grads_new, grads_old):
        assert (a - b).abs().max() <= 1e-5
    assert (grads_new[1][0, 37] != 0).any() and (grads_new[1][0, 36] != 0).any()  # every key is used somewhere


def test_single_document_rows_take_the_plain_causal_path_with_the_same_result():
    attn = Attention(32, 4, 2, 8, 1e-6)
    x = torch.randn(2, 6, 32)
    rot = (torch.ones(2, 6, 2, 8), torch.zeros(2, 6, 2, 8))
    whole_rows = Documents((0, 6, 12), torch.tensor([0, 6, 12], dtype=torch.int32), 6)
    assert torch.allclose(attn(x, rot, None), attn(x, rot, whole_rows), atol=1e-6)


def test_packed_row_logits_equal_documents_run_one_by_one():
    # Balance terms off: they are batch statistics, the logits are what must not leak.
    cfg = ModelConfig(zero_init_output=False, moe=MoEConfig(aux_loss_coef=0.0, group_balance_coef=0.0))
    model = build_model(cfg, seed=3).eval()
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (7, 12, 5)]
    packed = torch.cat(docs).view(1, -1)
    positions = torch.cat([torch.arange(len(d)) for d in docs]).view(1, -1)
    with torch.no_grad():
        together = model(packed, positions).logits[0]
        alone = torch.cat([model(d.view(1, -1), torch.arange(len(d)).view(1, -1)).logits[0] for d in docs])
    assert torch.allclose(together, alone, atol=1e-5)
    # And the check has teeth: without the position reset the second document's logits change.
    with torch.no_grad():
        leaky = model(packed, torch.arange(packed.shape[1]).view(1, -1)).logits[0]
    assert not torch.allclose(leaky[7:19], alone[7:19], atol=1e-3)


_PEAK = """
import resource, torch
from scimoe.model.attention import packed_attention
from scimoe.model.documents import Documents
t = 32768
positions = torch.cat([torch.arange(n) for n in (20000, 9000, 3768)]).view(1, t)
q = torch.randn(1, t, 2, 16, requires_grad=True); k = torch.randn(1, t, 1, 16, requires_grad=True)
v = torch.randn(1, t, 1, 16, requires_grad=True)
docs = Documents.from_positions(positions)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
packed_attention(q, k, v, docs, gqa=True).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_a_32k_token_row_needs_far_less_memory_than_one_dense_mask():
    # The dense mask of one 32,768-token row alone is 1 GiB (bool), its fp32 scores 4 GiB a head.
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=300, check=True)
    grown_mib = float(out.stdout.strip())
    assert grown_mib < 256, f"attention over a 32k-token packed row grew the process by {grown_mib:.0f} MiB"
