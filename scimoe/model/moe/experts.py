"""SwiGLU experts as one grouped matmul over expert-sorted tokens (no Python loop over experts).

Tested by `python -m pytest tests/model/test_experts.py`; timed by `python benchmarks/moe_layer.py`.
Weights use Hugging Face's Qwen3-MoE layout: gate_up_proj [E, 2F, H] (gate rows first), down_proj
[E, H, F], so export is a rename.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scimoe.model.recompute import recomputed


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm refuses expanded grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # torch's grouped_mm needs 16-byte aligned row strides on every operand.
    size = x.element_size()
    return all((dim * size) % 16 == 0 for dim in weight.shape[1:])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in] sorted by expert (counts [E] rows each) times weight[e]ᵀ ([E, out, in])."""
    weight = weight.to(x.dtype)
    if _grouped_mm_ok(x, weight):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets))
    # Unaligned widths (odd test shapes): a per-expert loop with the same result.
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ weight[e].t() for e, chunk in enumerate(chunks)])


class GroupedExperts(nn.Module):
    """E SwiGLU experts: down(silu(gate(x)) · up(x)) for each expert's segment of sorted rows."""

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.ffn_hidden = num_experts, hidden, ffn_hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.recompute = False
        """Free the SwiGLU intermediates after the forward and compute them again in the backward."""

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.recompute:
            return recomputed(self._swiglu, x_sorted, counts)
        return self._swiglu(x_sorted, counts)

    def _swiglu(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up = grouped_linear(x_sorted, self.gate_up_proj, counts).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down_proj, counts)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (shared expert, or the MLP of a dense layer)."""

    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.up_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.down_proj = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
