"""Every patch that lets megatron-core 0.16 run without CUDA, in one place, applied only without a GPU.

Used by `benchmarks/moe_layer.py` and the CPU parallel path; tested by `tests/parallel/test_cpu_shim.py`.
`apply_cpu_shim()` is a no-op when `torch.cuda.is_available()`: on a GPU nothing is patched. Each entry
of `PATCHES` names the megatron file that needs it and why; `applied()` lists what was done.
"""
from __future__ import annotations

import contextlib

import torch

PATCHES: list[tuple[str, str]] = [
    ("torch.cuda.Stream / current_stream / stream",
     "transformer/moe/token_dispatcher.py (alltoall DtoH side stream), moe/shared_experts.py: a CPU has one "
     "in-order stream; these become a do-nothing stream object and a null context"),
    ("torch.cuda.Event", "pipeline_parallel/*, moe/token_dispatcher.py: events record/wait on that one stream"),
    ("torch.cuda.synchronize", "pipeline_parallel/schedules.py, timers: nothing to wait for on CPU"),
    ("torch.cuda.current_device", "moe/router.py, moe/experts.py, tensor_parallel/layers.py: device=... for "
     "tensor creation; mapped to 'cpu'"),
    ("pipeline_parallel/schedules.py: torch.zeros(device='cuda')",
     "the schedules count tokens in a tensor created with a literal device='cuda'; the module sees a torch "
     "whose zeros() maps that device to the CPU"),
    ("moe_utils.te_general_gemm = None",
     "transformer/moe/moe_utils.py: referenced in router gating but only defined when Transformer Engine "
     "imports (NameError in 0.16.1 without TE)"),
    ("moe_utils.maybe_move_tensor_to_cpu (and its import in token_dispatcher.py)",
     "the alltoall dispatcher expects split sizes as numpy after this call, but the original converts only "
     "CUDA tensors, so on CPU the splits stay tensors and all_to_all_single rejects them"),
]

_applied: list[str] = []


class _CpuStream:
    """Stand-in for torch.cuda.Stream: CPU work is already in order."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _CpuStream)

    def __hash__(self) -> int:
        return 0


class _CpuEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_STREAM = _CpuStream()


def _maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            return tensor.numpy()
    return tensor


class _TorchWithCpuZeros:
    """The torch module as schedules.py sees it: zeros(device='cuda') lands on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def applied() -> list[str]:
    """Names of the patches applied in this process (empty on a GPU)."""
    return list(_applied)


def apply_cpu_shim() -> bool:
    """Patch torch.cuda and megatron-core for CPU runs; returns True if patches are in place."""
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    torch.cuda.Stream = lambda *a, **k: _STREAM  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.Event = _CpuEvent  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.Tensor.record_stream = lambda self, stream: None  # type: ignore[assignment]
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    schedules.torch = _TorchWithCpuZeros()

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    moe_utils.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
    _applied.extend(name for name, _ in PATCHES)
    return True
