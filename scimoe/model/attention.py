"""Grouped-query attention with per-head q/k RMSNorm over packed documents, without a dense mask.

Tested by `python -m pytest tests/model/test_attention.py`; measured by `python benchmarks/attention_memory.py`.

Packed documents are passed as their boundaries (`Documents` of scimoe/model/documents.py: cumulative lengths over the flattened batch, as
the variable-length kernels take them), never as a [T, T] mask: at 32k tokens such a mask is 1 GiB a row and
keeps SDPA off its fused kernels. Each document then runs plain causal attention: on CUDA in half precision
through PyTorch's variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`, one call for the whole
batch), elsewhere document by document through SDPA's causal path, whose CPU flash kernel and CUDA
memory-efficient kernel keep memory linear in the document length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scimoe.model.context import ContextDocuments
from scimoe.model.documents import Documents
from scimoe.model.norm import RMSNorm
from scimoe.model.recompute import recomputed
from scimoe.model.rotary import apply_rotary


def _varlen_kernel(q: torch.Tensor):
    """PyTorch's variable-length flash attention where it runs (CUDA, half precision), else None."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents,
                     gqa: bool) -> torch.Tensor:
    """Causal attention within each document; q, k, v are [B, T, H, D] and the result is q's shape."""
    b, t, h, d = q.shape
    q, k, v = q.reshape(b * t, h, d), k.reshape(b * t, -1, d), v.reshape(b * t, -1, d)
    kernel = _varlen_kernel(q)
    if kernel is not None:
        out = kernel(q, k, v, docs.cu, docs.cu, docs.longest, docs.longest, window_size=(-1, 0), enable_gqa=gqa)
    else:
        pieces = []
        for start, end in zip(docs.bounds, docs.bounds[1:]):
            span = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
            pieces.append(F.scaled_dot_product_attention(*span, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1))
        out = torch.cat(pieces)
    return out.reshape(b, t, h, d)


def _core(q, k, v, mask, causal: bool, gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


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
        self.recompute_core = False
        """Free the attention core's intermediates (softmax statistics, probabilities on the math kernel) after
        the forward and compute them again in the backward."""

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                docs: Documents | None, cache: dict | None = None) -> torch.Tensor:
        """`docs`: the packed documents of the batch (None: one per row). `cache` (generation): a dict holding
        this layer's rotated keys and values so far, extended in place by every call (the prompt, then one or
        more tokens per sequence)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).to(q.dtype)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.heads != self.kv_heads
        if isinstance(docs, ContextDocuments):  # this rank holds chunks of each row (context parallelism)
            if cache is not None:
                raise ValueError("generation with a KV cache under context parallelism is not built")
            out = recomputed(docs.attend, q, k, v, gqa) if self.recompute_core else docs.attend(q, k, v, gqa)
            return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))
        if docs is not None:
            if cache is not None:
                raise ValueError("a KV cache extends whole sequences, not packed documents")
            out = recomputed(packed_attention, q, k, v, docs, gqa) if self.recompute_core else \
                packed_attention(q, k, v, docs, gqa)
            return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))
        causal, mask = True, None
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[1]
                k, v = torch.cat((cache["k"], k), dim=1), torch.cat((cache["v"], v), dim=1)
                causal = False
                if t > 1:  # several new tokens (a tool's response): each sees the past and the new ones before it
                    mask = torch.arange(past + t, device=x.device)[None] <= past + torch.arange(t, device=x.device)[:, None]
            cache["k"], cache["v"] = k, v
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal, gqa)
        out = recomputed(_core, *args) if self.recompute_core and cache is None else _core(*args)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
