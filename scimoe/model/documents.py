"""Where the packed documents of a batch lie: the boundaries attention works within (scimoe/model/attention.py)
and context parallelism cuts around (scimoe/model/context.py). Tested by
`python -m pytest tests/model/test_attention.py tests/model/test_context.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Documents:
    """Where the packed documents of a [B, T] batch lie once flattened to B·T tokens.

    Document i covers flat tokens `bounds[i]:bounds[i + 1]`; a row boundary always ends a document. `cu` is the
    same as an int32 tensor on the batch's device (the variable-length kernels' `cu_seqlens`)."""

    bounds: tuple[int, ...]
    cu: torch.Tensor
    longest: int

    @staticmethod
    def from_positions(positions: torch.Tensor) -> "Documents | None":
        """The documents of `positions` [B, T], where a position of 0 starts a new one; None when every row is
        one document (attention then takes the plain causal kernel over whole rows)."""
        if not bool((positions[:, 1:] == 0).any()):
            return None
        starts = positions == 0
        starts[:, 0] = True
        flat = torch.nonzero(starts.reshape(-1)).flatten()
        bounds = torch.cat((flat, flat.new_tensor([positions.numel()])))
        host = tuple(bounds.tolist())
        longest = max(b - a for a, b in zip(host, host[1:]))
        return Documents(host, bounds.to(torch.int32), longest)


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor | None:
    """The dense [B, 1, T, T] mask of the same rule (causal, within a document): the reference that tests and
    `benchmarks/attention_memory.py` compare against. The model never builds it."""
    if not bool((positions[:, 1:] == 0).any()):
        return None
    doc = torch.cumsum((positions == 0).int(), dim=-1)
    same_doc = doc.unsqueeze(-1) == doc.unsqueeze(-2)
    t = positions.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
    return (same_doc & causal).unsqueeze(1)
