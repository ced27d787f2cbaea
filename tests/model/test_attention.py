"""Packed documents never see each other: `python -m pytest tests/model/test_attention.py`."""
from __future__ import annotations

import torch

from scimoe.config import ModelConfig, MoEConfig
from scimoe.model import build_model
from scimoe.model.attention import document_causal_mask


def test_mask_is_causal_and_blocks_other_documents():
    mask = document_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]).bool()
    assert torch.equal(mask, expected)
    assert document_causal_mask(torch.tensor([[0, 1, 2], [5, 6, 7]])) is None  # one document per row


def test_masked_and_plain_causal_paths_agree_on_a_single_document():
    from scimoe.model.attention import Attention

    attn = Attention(32, 4, 2, 8, 1e-6)
    x = torch.randn(1, 6, 32)
    rot = (torch.ones(1, 6, 2, 8), torch.zeros(1, 6, 2, 8))
    explicit = torch.ones(6, 6, dtype=torch.bool).tril().view(1, 1, 6, 6)
    assert torch.allclose(attn(x, rot, None), attn(x, rot, explicit), atol=1e-6)


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
