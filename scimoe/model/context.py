"""Context parallelism as the model sees it: which positions of a row this rank holds, and causal attention of
those positions over the keys and values of the whole row. Plain PyTorch; the exchange itself is handed in.

Tested by `python -m pytest tests/model/test_context.py` (every cp rank's attention against the whole row's)
and `tests/distributed/test_parity.py` (cp2, cp2×tp2, cp2×ep2, cp2×pp2 against one process).

A row of T positions is cut into 2·cp chunks of c = T / (2·cp); rank r holds chunks r and 2·cp−1−r, so every
rank gets as much causal work as any other (an early chunk attends to few keys, its partner to many). Each rank
embeds whole rows (the vision and time-series encoders see whole images and series) and keeps its chunks;
positions (RoPE / FoPE) are the row's own, so rotating a chunk is rotating those positions. Attention takes the
keys and values of every chunk (`exchange`, an all-gather over the cp ranks in scimoe/parallel/context.py,
whose backward sums each rank's key/value gradients back to their owner) and runs, for each of the rank's
query chunks and each document piece in it, causal attention over the keys from the document's start to the
piece's end (lower-right aligned, so position i sees keys ≤ i). A piece that starts its document is a square
causal block (SDPA's fused causal kernels). One that continues a document from an earlier chunk is two blocks
merged by their log-sum-exps, as ring attention merges its steps: the keys before the piece (all visible) and
the piece's own square causal block; on CPU both run in torch's flash kernel, whose backward takes the merged
output and log-sum-exp, so nothing of size queries × keys is ever stored (a lower-right mask would be: SDPA
keeps it, in fp32, for the backward). On CUDA the same piece goes to SDPA with torch's `causal_lower_right` bias
(flash / memory-efficient kernels with lower-right alignment; not run here: no GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from scimoe.model.documents import Documents



def chunk_indices(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Row positions rank `rank` of `cp` holds: chunks rank and 2·cp−1−rank of 2·cp equal chunks, in that order."""
    if length % (2 * cp):
        raise ValueError(f"train.seq_len ({length}) must be divisible by 2 × parallel.cp ({2 * cp}): context "
                         "parallelism cuts each row into 2·cp equal chunks")
    c = length // (2 * cp)
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat((torch.arange(first, first + c, device=device), torch.arange(second, second + c, device=device)))


def row_order(length: int, cp: int, device=None) -> torch.Tensor:
    """Where each row position lies in the concatenation of every rank's positions (rank 0's first)."""
    held = torch.cat([chunk_indices(length, cp, r) for r in range(cp)])
    return torch.argsort(held).to(device)


def document_starts(positions: torch.Tensor) -> torch.Tensor:
    """[B, T] index in the row where each position's document starts (a position of 0 starts one; so does the
    row)."""
    b, t = positions.shape
    index = torch.arange(t, device=positions.device).expand(b, t)
    starts = torch.where(positions == 0, index, torch.zeros_like(index))
    return torch.cummax(starts, dim=1).values


@dataclass(frozen=True)
class Piece:
    """Queries local[q0:q1] of row `row` are row positions [p0, p0 + q1 − q0) of one document starting at `start`."""

    row: int
    q0: int
    q1: int
    p0: int
    start: int


@dataclass(frozen=True)
class ContextDocuments:
    """A micro-batch's documents as one cp rank sees them: the pieces its positions make and how to fetch the
    row's keys and values. Passed where the model passes `Documents`; attention then calls `attend`."""

    pieces: tuple[Piece, ...]
    exchange: Callable[[torch.Tensor], torch.Tensor]
    """[B, T/cp, h, d] this rank's keys (or values) → [B, T, h, d] the whole row's, in row order."""

    @staticmethod
    def build(positions: torch.Tensor, cp: int, rank: int, exchange) -> "ContextDocuments":
        """`positions` [B, T] of whole rows."""
        b, t = positions.shape
        held = chunk_indices(t, cp, rank)
        starts = document_starts(positions.cpu())[:, held]
        c = t // (2 * cp)
        changes = starts[:, 1:] != starts[:, :-1]
        changes[:, c - 1] = True  # the rank's two chunks are cut apart too
        pieces = []
        for row in range(b):
            cut = [0] + (torch.nonzero(changes[row]).flatten() + 1).tolist() + [2 * c]
            firsts = starts[row, cut[:-1]].tolist()
            for a, z, start in zip(cut, cut[1:], firsts):
                pieces.append(Piece(row, a, z, int(held[a]), start))
        return ContextDocuments(tuple(pieces), exchange)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Causal attention within documents of this rank's queries [B, T/cp, H, D] over the whole row."""
        keys, values = self.exchange(k), self.exchange(v)
        out = torch.empty_like(q)
        for p in self.pieces:
            end = p.p0 + p.q1 - p.q0
            span = (q[p.row, p.q0:p.q1], keys[p.row, p.start:end], values[p.row, p.start:end])
            out[p.row, p.q0:p.q1] = lower_right_causal(*(x.transpose(0, 1) for x in span), gqa).transpose(0, 1)
        return out


def lower_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Attention of the last L of S positions ([h, L, d] queries, [h_kv, S, d] keys and values): query i sees
    keys ≤ i + S − L."""
    length, span = q.shape[1], k.shape[1]
    if length == span:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.device.type != "cpu":
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(length, span), enable_gqa=gqa)
    return _ContinuedDocument.apply(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0]


class _ContinuedDocument(torch.autograd.Function):
    """CPU: [1, h, L, d] queries over [1, h_kv, S, d] keys, lower-right causal, as (earlier keys, all visible) ⊕
    (the last L keys, causal), merged by log-sum-exp; the backward runs the flash backward of each block with the
    merged output and log-sum-exp (exact: each block's probabilities are then the merged softmax's)."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: D102
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        before = k.shape[2] - q.shape[2]
        out_a, lse_a = flash(q, k[:, :, :before], v[:, :, :before], 0.0, False)
        out_b, lse_b = flash(q, k[:, :, before:], v[:, :, before:], 0.0, True)
        lse = torch.logaddexp(lse_a, lse_b)
        out = ((lse_a - lse).exp().unsqueeze(-1) * out_a + (lse_b - lse).exp().unsqueeze(-1) * out_b).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        flash_grad = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        before = k.shape[2] - q.shape[2]
        grad = grad.contiguous()
        dq_a, dk_a, dv_a = flash_grad(grad, q, k[:, :, :before], v[:, :, :before], out, lse, 0.0, False)
        dq_b, dk_b, dv_b = flash_grad(grad, q, k[:, :, before:], v[:, :, before:], out, lse, 0.0, True)
        return dq_a + dq_b, torch.cat((dk_a, dk_b), dim=2), torch.cat((dv_a, dv_b), dim=2)


class LocalContext:
    """One rank holds whole rows: nothing to split, documents as the single process has them."""

    cp = 1

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, …] whole rows → this rank's positions of them."""
        return x

    def documents(self, positions: torch.Tensor):
        return Documents.from_positions(positions)
