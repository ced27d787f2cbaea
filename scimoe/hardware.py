"""Peak rates of the accelerators `cluster.gpu` names (vendor datasheets, dense, no sparsity).

Read by the MFU metric and `scimoe-plan`; bandwidths are per GPU, one direction. `cpu` is a nominal
1 TFLOP/s so CPU smoke runs report a finite MFU (set `cluster.peak_tflops` for a real figure).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    bf16_tflops: float
    """Dense bf16 tensor-core peak."""
    memory_gib: float
    """Device memory."""
    hbm_tbps: float
    """Memory bandwidth, TB/s."""
    nvlink_gbps: float
    """Intra-node bandwidth per GPU, GB/s, one direction."""
    network_gbps: float
    """Inter-node bandwidth per GPU (one 400 Gb/s NIC each), GB/s."""
    pcie_gbps: float = 50.0
    """Host <-> device bandwidth per GPU, GB/s, one direction (PCIe Gen5 x16 in practice; Gen4 for A100)."""
    host_gib_per_gpu: float = 240.0
    """Host memory per GPU for offloaded optimizer state (a 2 TiB node of 8 GPUs, less the OS and data loaders)."""


ACCELERATORS = {
    "h100": Accelerator(bf16_tflops=989.0, memory_gib=80.0, hbm_tbps=3.35, nvlink_gbps=450.0, network_gbps=50.0),
    "h200": Accelerator(bf16_tflops=989.0, memory_gib=141.0, hbm_tbps=4.8, nvlink_gbps=450.0, network_gbps=50.0),
    "a100": Accelerator(bf16_tflops=312.0, memory_gib=80.0, hbm_tbps=2.0, nvlink_gbps=300.0, network_gbps=25.0,
                        pcie_gbps=25.0),
    "b200": Accelerator(bf16_tflops=2250.0, memory_gib=180.0, hbm_tbps=8.0, nvlink_gbps=900.0, network_gbps=50.0),
    "cpu": Accelerator(bf16_tflops=1.0, memory_gib=24.0, hbm_tbps=0.05, nvlink_gbps=10.0, network_gbps=1.0,
                       pcie_gbps=10.0, host_gib_per_gpu=24.0),
}


def peak_tflops(cluster) -> float:
    """`cluster.peak_tflops`, or the table value of `cluster.gpu`."""
    return cluster.peak_tflops or ACCELERATORS[cluster.gpu].bf16_tflops
