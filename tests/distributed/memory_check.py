"""What a rank really allocates vs `scimoe.plan.memory`: parameters, gradients and AdamW state in bytes
(exact) and the bytes autograd saves for the backward of one micro-batch (activations, within 10%).
Used in-process by tests/plan/test_memory_plan.py and per rank by tests/distributed/worker.py."""
from __future__ import annotations

import torch

from scimoe.config import Config
from scimoe.data.loader import StepLoader
from scimoe.data.sources import build_rows
from scimoe.model import build_model
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.parallelize import parallelize
from scimoe.parallel.grad_buckets import param_grad
from scimoe.parallel.runtime import install_grad_buckets, master_shards, optimizer_shards, sync_grads
from scimoe.plan.memory import plan_memory
from scimoe.train.optim import build_optimizer
from scimoe.train.master import MasterOptimizer, cast_to_bf16
from scimoe.train.step import forward_backward


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(cfg: Config, dims: ParallelDims, run_dir: str) -> dict:
    """One step of `cfg` in `dims` on this rank: measured bytes and the planner's for this rank."""
    dims = dims.build_groups()
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.set_recompute(cfg.train.recompute, cfg.train.recompute_layers)
    chunks = parallelize(model, dims)
    if cfg.train.mixed:  # as Session builds it: buckets, masters from the fp32 init, then the cast
        install_grad_buckets(model, dims, cfg.parallel.grad_bucket_mb, False, True,
                             torch.bfloat16 if cfg.parallel.grad_reduce_dtype == "bf16" else torch.float32)
        optimizer = MasterOptimizer(model, cfg.train, master_shards(model, dims, cfg.parallel.zero),
                                    offload=cfg.train.optimizer_offload == "cpu")
        if cfg.train.dtype == "bf16":
            cast_to_bf16(model)
    else:
        optimizer = build_optimizer(model, cfg.train, optimizer_shards(model, dims, cfg.parallel.zero))
    loader = StepLoader(build_rows(cfg, run_dir), cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seed,
                        dims.groups.dp_rank, dims.dp)
    batches = loader.next_step()
    assert len(batches) == 1, "measure one micro-batch per step"
    owned = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    from scimoe.model import recompute

    plain_checkpoint = recompute.checkpoint

    def checkpoint_keeping(fn, *args, **kwargs):  # a recomputed block keeps its inputs instead of its saved tensors
        for arg in args:
            for t in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(t, torch.Tensor):
                    pack(t)
        return plain_checkpoint(fn, *args, **kwargs)

    labels = int(dims.reduce_sum(torch.tensor(int((batches[0]["labels"] != -100).sum()))))
    recompute.checkpoint = checkpoint_keeping
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_backward(model, chunks, batches, labels, dims, cfg.train.dtype)
    finally:
        recompute.checkpoint = plain_checkpoint
    sync_grads(model, dims)
    grads = _tensor_bytes(g for g in map(param_grad, model.parameters()) if g is not None)
    step_grads = []
    if cfg.train.optimizer_offload == "cpu":  # the gradients copied to the host for DeepSpeed's step
        inner_step = optimizer.inner.step
        optimizer.inner.step = lambda: (step_grads.extend(m.grad for m in optimizer.masters.values()
                                                          if m.grad is not None), inner_step())
    optimizer.step()
    adam = _tensor_bytes(t for _, state in optimizer.parameter_states() for t in state.values())
    adam += _tensor_bytes(getattr(optimizer, "masters", {}).values())
    host = 0
    if cfg.train.optimizer_offload == "cpu":  # what lives in host memory, with the gradient copies the step makes
        host, adam = adam + _tensor_bytes(step_grads), 0
    stage = plan_memory(cfg, dims.world_size).stages[dims.groups.pp_rank]
    return {
        "params": _tensor_bytes(model.parameters()), "planned_params": stage.params_bytes,
        "grads": grads, "planned_grads": stage.grads_bytes,
        "optimizer": adam, "planned_optimizer": stage.optimizer_bytes_per_rank[dims.rank % (dims.tp * dims.dp)],
        "host": host, "planned_host": (stage.host_bytes_per_rank or [0] * (dims.tp * dims.dp))[dims.rank % (dims.tp * dims.dp)],
        "activations": sum(saved.values()), "planned_activations": stage.activation_bytes_per_microbatch,
    }
