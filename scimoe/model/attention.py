"""Grouped-query attention with per-head q/k RMSNorm and a packed-document causal mask.

Tested by `python -m pytest tests/model/test_attention.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scimoe.model.norm import RMSNorm
from scimoe.model.rotary import apply_rotary


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, T, T] bool mask: causal, and a token sees only its own packed document.

    A position of 0 starts a new document, so packed rows never attend across documents. Rows with
    one document each need no mask (None): attention then takes its faster plain-causal kernel.
    """
    if not bool((positions[:, 1:] == 0).any()):
        return None
    doc = torch.cumsum((positions == 0).int(), dim=-1)
    same_doc = doc.unsqueeze(-1) == doc.unsqueeze(-2)
    t = positions.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
    return (same_doc & causal).unsqueeze(1)


class Attention(nn.Module):
    """GQA self-attention: q/k/v/o projections without bias, RMSNorm on each q and k head."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:
        """`cache` (generation): a dict holding this layer's rotated keys and values so far, extended in
        place by every call (the prompt, then one or more tokens per sequence)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        causal = mask is None
        if cache is not None:
            if "k" in cache:
                if mask is not None:
                    raise ValueError("a KV cache extends whole sequences, without a document mask")
                past = cache["k"].shape[1]
                k, v = torch.cat((cache["k"], k), dim=1), torch.cat((cache["v"], v), dim=1)
                causal = False
                if t > 1:  # several new tokens (a tool's response): each sees the past and the new ones before it
                    mask = torch.arange(past + t, device=x.device)[None] <= past + torch.arange(t, device=x.device)[:, None]
            cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).to(q.dtype), attn_mask=mask,
            is_causal=causal, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
