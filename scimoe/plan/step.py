"""Per-step communication volume by kind and an estimated step time and MFU for a layout.

Tested by `python -m pytest tests/plan/test_planner.py`. Volumes are the bytes one rank sends per
optimizer step (ring all-reduce moves 2·(n−1)/n of the buffer, all-gather and all-to-all (n−1)/n):
- dp gradient all-reduce of the dense gradients (fp32, or parallel.grad_reduce_dtype under bf16), and of the
  expert gradients over expert-dp;
- ZeRO-1 parameter broadcast after the step ((n−1)/n of the parameters, in their dtype: bf16 matrices under
  train.dtype=bf16, whose owners broadcast the updated weights);
- tp: per layer and micro-batch, 2 all-reduces of the [tokens, H] activations forward and 2 backward,
  plus the embedding and LM-head collectives;
- ep: per MoE layer and micro-batch, dispatch + combine forward and their transposes backward, each
  tokens·K·H activations (the share leaving the rank: (ep−1)/ep);
- pp: per micro-batch and stage boundary, the [tokens, H] activation forward and its gradient backward;
- cp: per layer and micro-batch, the all-gather of the row's keys and values forward and the all-reduce of
  their gradients backward (tokens here are a rank's T/cp positions of each row).
Time: compute = model FLOPs / (peak × `matmul_efficiency`), stretched by the 1F1B bubble
(pp−1)/(v·m + pp − 1) for m micro-batches and v virtual stages; tp and ep traffic is on the critical
path, intra-node over NVLink when the group fits in a node, else the network; the dp traffic runs over the
network when dp spans nodes and, with parallel.overlap_grad_reduce, hides behind the backward (two thirds of
the compute) except its last bucket; the ZeRO broadcast follows the step. Optimizer offload adds the
gradient copies to the host and the weights back over PCIe, and DeepSpeed's CPU Adam at
`HOST_ADAM_PARAMS_PER_S` per GPU (measured 0.43 G params/s per core here; 8 cores per GPU, and host memory
bandwidth, ~28 bytes per parameter, caps it near that). Recomputation
adds its second forward to the device's work (not to the model FLOPs MFU counts): `full` one forward of
every layer (a third of the training FLOPs), `selective` the experts' gate/up matmuls and the attention
core (and its repeated collectives are not modelled).
"""
from __future__ import annotations

from dataclasses import dataclass

from scimoe.config import Config
from scimoe.hardware import ACCELERATORS, peak_tflops
from scimoe.model.counting import training_flops_per_token
from scimoe.plan.memory import MemoryPlan, layout

HOST_ADAM_PARAMS_PER_S = 1.5e9


@dataclass
class StepPlan:
    comm_bytes: dict[str, float]
    """Bytes one rank sends per optimizer step, by kind (dp, zero, tp, ep, pp, cp)."""
    compute_s: float
    bubble: float
    comm_s: dict[str, float]
    step_s: float
    mfu: float
    tokens_per_s: float


def recompute_flops_per_token(cfg: Config) -> float:
    """FLOPs the backward spends running blocks again, per trained token (train.recompute over all layers)."""
    m, mode = cfg.model, cfg.train.recompute
    share = len(cfg.train.recompute_layers) / m.layers if cfg.train.recompute_layers is not None else 1.0
    if mode == "full":
        return training_flops_per_token(m, cfg.train.seq_len) / 3 * share
    if mode == "selective":
        moe_layers = m.layers - m.moe.dense_layers
        gate_up = 2 * m.moe.top_k * 2 * m.moe.ffn_hidden * m.hidden * moe_layers
        core = 2 * m.layers * m.heads * m.head_dim * cfg.train.seq_len  # q·kᵀ and p·v over S/2 keys on average
        return (gate_up + core) * share
    return 0.0


def plan_step(cfg: Config, memory: MemoryPlan, world: int, matmul_efficiency: float = 0.55) -> StepPlan:
    m, par, train, cluster = cfg.model, cfg.parallel, cfg.train, cfg.cluster
    dims = layout(cfg, world)
    tp, pp, ep, cp = dims.tp, dims.pp, dims.ep, dims.cp
    dp, expert_dp = dims.dp, dims.expert_dp  # dp counts the cp ranks too: they sum gradients like data-parallel ones
    gpu = ACCELERATORS[cluster.gpu]
    act = 4 if train.dtype == "fp32" else 2
    micro = max(1, train.global_batch // (train.micro_batch * dims.data_parallel))
    tokens = train.micro_batch * train.seq_len // cp
    worst = memory.worst()
    layers = len([i for i in range(worst.layers.start, worst.layers.stop)])
    moe_layers = len([i for i in range(worst.layers.start, worst.layers.stop) if i >= m.moe.dense_layers])
    ring = lambda n: 2 * (n - 1) / n if n > 1 else 0.0  # noqa: E731
    share = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731
    mixed = train.dtype == "bf16" or train.optimizer_offload != "none"
    grad = 2 if mixed and par.grad_reduce_dtype == "bf16" else 4
    weight = 2 if train.dtype == "bf16" else 4
    comm = {
        "dp": grad * worst.dense_params * ring(dp) + grad * worst.expert_params * ring(expert_dp),
        "zero": (weight * worst.dense_params * share(dp) + weight * worst.expert_params * share(expert_dp))
        if par.zero else 0.0,
        "tp": micro * (4 * layers + 4) * tokens * m.hidden * act * ring(tp),
        "ep": micro * moe_layers * 4 * tokens * m.moe.top_k * m.hidden * act * share(ep) * dims.routed_fraction,
        "pp": micro * 2 * tokens * m.hidden * act if pp > 1 else 0.0,
        "cp": micro * layers * 2 * tokens * cp * m.kv_heads // tp * m.head_dim * act * (share(cp) + ring(cp)),
    }
    per_node = cluster.gpus_per_node
    intra = lambda group: group <= per_node  # noqa: E731  (megatron puts tp, then ep, fastest-varying)
    bandwidth = {
        "tp": gpu.nvlink_gbps if intra(tp) else gpu.network_gbps,
        "ep": gpu.nvlink_gbps if intra(tp * ep) else gpu.network_gbps,
        "dp": gpu.nvlink_gbps if intra(tp * dp) else gpu.network_gbps,
        "zero": gpu.nvlink_gbps if intra(tp * dp) else gpu.network_gbps,
        "pp": gpu.network_gbps if tp * dp * ep > per_node or world > per_node else gpu.nvlink_gbps,
        "cp": gpu.nvlink_gbps if intra(tp * cp) else gpu.network_gbps,  # megatron's order: tp, then cp
    }
    comm_s = {kind: volume / (bandwidth[kind] * 1e9) for kind, volume in comm.items()}
    flops_per_rank = training_flops_per_token(m, train.seq_len) * train.global_batch * train.seq_len / world
    compute_s = (flops_per_rank + recompute_flops_per_token(cfg) * train.global_batch * train.seq_len / world) \
        / (peak_tflops(cluster) * 1e12 * matmul_efficiency)
    if par.overlap_grad_reduce and comm_s["dp"] > 0:
        buckets = max(1.0, grad * (worst.dense_params + worst.expert_params) / (par.grad_bucket_mb * 2**20))
        comm_s["dp"] = max(comm_s["dp"] - 2 / 3 * compute_s, comm_s["dp"] / buckets)
    if train.optimizer_offload != "none":  # this rank's owned share: gradients down, weights up, and the host step
        owned = max(worst.host_bytes_per_rank) / 16  # host bytes are 16 per owned element
        comm["offload"] = owned * (4 + weight)
        comm_s["offload"] = comm["offload"] / (gpu.pcie_gbps * 1e9) + owned / HOST_ADAM_PARAMS_PER_S
    bubble = (pp - 1) / (par.pp_virtual * micro + pp - 1) if pp > 1 else 0.0
    step_s = compute_s / (1 - bubble) + sum(comm_s.values())
    mfu = flops_per_rank / (step_s * peak_tflops(cluster) * 1e12)
    return StepPlan(comm_bytes=comm, compute_s=compute_s, bubble=bubble, comm_s=comm_s, step_s=step_s, mfu=mfu,
                    tokens_per_s=train.global_batch * train.seq_len / step_s)
