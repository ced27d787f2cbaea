"""The megatron-core CPU shim patches only without a GPU: `python -m pytest tests/parallel/test_cpu_shim.py`."""
from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_nothing_is_patched_when_cuda_is_present():
    proc = _run("import torch; torch.cuda.is_available = lambda: True\n"
                "original = torch.cuda.synchronize\n"
                "from scimoe.parallel import cpu_shim\n"
                "assert cpu_shim.apply_cpu_shim() is False\n"
                "assert cpu_shim.applied() == [] and torch.cuda.synchronize is original\n"
                "print('untouched')")
    assert proc.returncode == 0 and "untouched" in proc.stdout, proc.stderr[-2000:]


def test_every_listed_patch_is_applied_without_cuda_and_megatron_router_runs():
    proc = _run("import torch\n"
                "from scimoe.parallel import cpu_shim\n"
                "assert cpu_shim.apply_cpu_shim() is True\n"
                "assert cpu_shim.applied() == [name for name, _ in cpu_shim.PATCHES]\n"
                "from megatron.core.transformer.moe import moe_utils\n"
                "out = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)\n"
                "assert out.tolist() == [1, 2] and type(out).__module__ == 'numpy'\n"
                "from megatron.core.pipeline_parallel import schedules\n"
                "assert schedules.torch.zeros([], device='cuda').device.type == 'cpu'\n"
                "print('patched')")
    assert proc.returncode == 0 and "patched" in proc.stdout, proc.stderr[-2000:]
