"""What a rank really allocates vs `scimoe.plan.memory`: parameters, gradients and AdamW state in bytes
(exact), the bytes autograd saves for the backward of one micro-batch (activations, within 10%) and the peak
of a whole step as torch's MemTracker sees it (within 10% under mixed precision).
Used in-process by tests/plan/test_memory_plan.py and per rank by tests/distributed/worker.py."""
from __future__ import annotations

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from scimoe.config import Config
from scimoe.data.loader import StepLoader
from scimoe.data.sources import build_rows
from scimoe.model import build_model
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.parallelize import parallelize
from scimoe.parallel.grad_buckets import param_grad
from scimoe.parallel.runtime import make_grad_buckets, master_shards, optimizer_shards, sync_grads
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
    # as Session builds it: gradient buckets; under mixed precision masters from the fp32 init, then the cast
    buckets = make_grad_buckets(model, dims, cfg.parallel.grad_bucket_mb, False, cfg.train.mixed,
                                torch.bfloat16 if cfg.parallel.grad_reduce_dtype == "bf16" else torch.float32)
    if cfg.train.mixed:
        optimizer = MasterOptimizer(model, cfg.train, master_shards(model, dims, cfg.parallel.zero),
                                    offload=cfg.train.optimizer_offload == "cpu")
        if cfg.train.dtype == "bf16":
            cast_to_bf16(model)
    else:
        optimizer = build_optimizer(model, cfg.train, optimizer_shards(model, dims, cfg.parallel.zero))
    loader = StepLoader(build_rows(cfg, run_dir), cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seed,
                        dims.groups.data_rank, dims.data_parallel)
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

    labels = int(dims.reduce_sum(torch.tensor(int((dims.context_share(batches[0]["labels"]) != -100).sum()))))
    recompute.checkpoint = checkpoint_keeping
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_backward(model, chunks, batches, labels, dims, cfg.train.dtype, buckets)
    finally:
        recompute.checkpoint = plain_checkpoint
    sync_grads(model, dims, buckets)
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
    optimizer.zero_grad()
    if buckets is not None:
        buckets.zero()
    # The peak of a whole step (forward, backward, reductions, optimizer): torch's MemTracker follows every tensor
    # storage from here on; what exists already (weights, buckets, optimizer state) is registered with it.
    tracker = MemTracker()
    state = [t for o in optimizer.local_optimizers() for st in o.state.values() for t in st.values() if torch.is_tensor(t)]
    tracker.track_external(model, *state, *getattr(optimizer, "masters", {}).values(),
                           *(b.buffer for b in (buckets.buckets if buckets else [])))
    with tracker:
        forward_backward(model, chunks, loader.next_step(), labels, dims, cfg.train.dtype, buckets)
        sync_grads(model, dims, buckets)
        optimizer.step()
    peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    stage = plan_memory(cfg, dims.world_size).stages[dims.groups.pp_rank]
    place = dims.rank % (dims.tp * dims.dp)
    planned_peak = stage.total_on_rank(place)
    if cfg.train.optimizer_offload == "cpu":  # host and device are one memory here, and the "copy" of a gradient
        # to the host is the bucket itself: the offloaded masters and moments add to the peak, nothing else
        planned_peak += stage.host_resident_bytes_per_rank[place]
    return {
        "params": _tensor_bytes(model.parameters()), "planned_params": stage.params_bytes,
        "grads": grads, "planned_grads": stage.grads_bytes,
        "optimizer": adam, "planned_optimizer": stage.optimizer_bytes_per_rank[dims.rank % (dims.tp * dims.dp)],
        "host": host, "planned_host": (stage.host_bytes_per_rank or [0] * (dims.tp * dims.dp))[dims.rank % (dims.tp * dims.dp)],
        "activations": sum(saved.values()), "planned_activations": stage.activation_bytes_per_microbatch,
        "peak": peak, "planned_peak": planned_peak, "mixed": cfg.train.mixed,
    }
