"""What a rank really allocates vs `scimoe.plan.memory`: parameters, gradients and AdamW state in bytes
(exact) and the bytes autograd saves for the backward of one micro-batch (activations, within 20%).
Used in-process by tests/plan/test_memory_plan.py and per rank by tests/distributed/worker.py."""
from __future__ import annotations

import torch

from scimoe.config import Config
from scimoe.data.loader import StepLoader
from scimoe.data.sources import build_rows
from scimoe.model import build_model
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.parallelize import parallelize
from scimoe.parallel.runtime import optimizer_shards, sync_grads
from scimoe.plan.memory import plan_memory
from scimoe.train.optim import build_optimizer
from scimoe.train.step import forward_backward


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(cfg: Config, dims: ParallelDims, run_dir: str) -> dict:
    """One step of `cfg` in `dims` on this rank: measured bytes and the planner's for this rank."""
    dims = dims.build_groups()
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.set_recompute(cfg.train.recompute, cfg.train.recompute_layers)
    chunks = parallelize(model, dims)
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
            forward_backward(model, chunks, batches, labels, dims)
    finally:
        recompute.checkpoint = plain_checkpoint
    sync_grads(model, dims)
    grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    adam = _tensor_bytes(t for _, state in optimizer.parameter_states() for t in state.values())
    stage = plan_memory(cfg, dims.world_size).stages[dims.groups.pp_rank]
    return {
        "params": _tensor_bytes(model.parameters()), "planned_params": stage.params_bytes,
        "grads": grads, "planned_grads": stage.grads_bytes,
        "optimizer": adam, "planned_optimizer": stage.optimizer_bytes_per_rank[dims.rank % (dims.tp * dims.dp)],
        "activations": sum(saved.values()), "planned_activations": stage.activation_bytes_per_microbatch,
    }
