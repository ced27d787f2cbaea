"""Data-parallel gradient reduction in fixed-size buckets, started during the backward.

Tested by `python -m pytest tests/distributed/test_grad_buckets.py`; measured by `python benchmarks/memory_modes.py`.

Megatron-core's DistributedDataParallel does this with contiguous CUDA grad buffers and its own parameter
wrapper; ours works on any device and with our modules (docs/design.md says why not theirs). Each parameter
that trains owns a slice of a persistent flat buffer of its reduction group (dense weights over dp, expert
shards over expert-dp), cut into buckets of at most `parallel.grad_bucket_mb`. A hook after every gradient
accumulation adds the new gradient into that slice and frees it, so the buffer is the gradient memory itself,
never a copy of it. Once sync is on (the last micro-batch's backward: the step's loop and megatron's pipeline
schedule say when, through `no_sync`) and every parameter of a bucket has had its gradient, the bucket's
all-reduce starts asynchronously; buckets always start in the same order on every rank, so ranks whose
parameters become ready at different moments still issue the same collective sequence. `finish()` starts what
is left, waits, and points each `param.grad` at its reduced slice. A parameter no rank used this step keeps
`grad = None` (a per-parameter "used" count travels in the bucket), as in one process, so the optimizer skips
it. With `parallel.overlap_grad_reduce=false` nothing starts before `finish()`: the same buckets and the same
collectives, so the result is bitwise the same.

The buckets talk over their own communicators (copies of the dp / expert-dp groups): a rank whose batch leaves a
bucket unused (no image in it, say) starts that bucket only in `finish()`, after collectives that other ranks
issue later on the same group (the step's loss sum); on a shared communicator those would pair up wrongly.

Under mixed precision (scimoe/train/master.py) the parameters are bf16 and the buffer fp32 (or bf16:
`parallel.grad_reduce_dtype`), so the sums go to `param.main_grad` (megatron's name) instead of `param.grad`;
`param_grad(p)` reads whichever the model uses. There every model gets buckets, with no group on one process:
they are where the micro-batches' gradients accumulate in fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def param_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer steps with: `main_grad` under mixed precision, else `grad`."""
    return vars(p)["main_grad"] if "main_grad" in vars(p) else p.grad


def private_group(group, world_group_ranks: list[tuple[int, ...]], timeout_s: float):
    """A new communicator over `group`'s ranks, its collectives failing after `timeout_s`. Every rank passes every
    group's rank tuple (all ranks create all groups, in the same order, as torch requires)."""
    mine, made = tuple(dist.get_process_group_ranks(group)), None
    for ranks in sorted(set(world_group_ranks)):
        created = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))
        if ranks == mine:
            made = created
    return made


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    group: object
    buffer: torch.Tensor
    """[Σ numel + len(params)]: the gradients, then one "used" count per parameter."""
    offsets: list[int]
    ready: set = field(default_factory=set)
    handle: object = None


class GradBuckets:
    """Bucketed, optionally overlapped gradient sums over (params, group) pairs; see the module docstring."""

    def __init__(self, groups: list[tuple[list[torch.nn.Parameter], object]], bucket_bytes: int, overlap: bool,
                 dtype: torch.dtype = torch.float32, main_grad: bool = False) -> None:
        """`groups`: [(parameters, process group or None = nothing to sum)]."""
        self.overlap, self.sync, self.started = overlap, False, 0
        self.dtype, self.main_grad = dtype, main_grad
        self.started_in_backward = 0
        """How many buckets the last step started before `finish()` (0 without overlap)."""
        self.buckets: list[_Bucket] = []
        self.where: dict[int, tuple[_Bucket, int, int]] = {}
        for params, group in groups:
            trained = [p for p in params if p.requires_grad]
            pending: list[torch.nn.Parameter] = []
            for p in reversed(trained):  # roughly the order the backward produces them
                pending.append(p)
                if sum(q.numel() for q in pending) * dtype.itemsize >= bucket_bytes:
                    self._add(pending, group)
                    pending = []
            if pending:
                self._add(pending, group)
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulated)
                       for b in self.buckets for p in b.params]

    def _add(self, params: list[torch.nn.Parameter], group) -> None:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        bucket = _Bucket(params, group, torch.zeros(total + len(params), dtype=self.dtype,
                                                    device=params[0].device), offsets)
        for i, (p, start) in enumerate(zip(params, offsets)):
            self.where[id(p)] = (bucket, start, i)
        self.buckets.append(bucket)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        bucket, start, i = self.where[id(p)]
        grads = bucket.buffer[start:start + p.numel()]
        grads.add_(p.grad.reshape(-1))
        bucket.buffer[bucket.offsets[-1] + bucket.params[-1].numel() + i] = 1.0
        p.grad = None
        if self.sync:
            bucket.ready.add(id(p))
            if self.overlap:
                self._start_ready()

    def _start_ready(self) -> None:
        while self.started < len(self.buckets) and len(self.buckets[self.started].ready) == \
                len(self.buckets[self.started].params):
            self._start(self.buckets[self.started])

    def _start(self, bucket: _Bucket) -> None:
        if bucket.group is not None:
            bucket.handle = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)
        self.started += 1

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate only (every micro-batch but the last; megatron's no_sync_func)."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    @contextlib.contextmanager
    def syncing(self):
        """The backward pass inside is the step's last for these parameters: buckets start as they fill."""
        self.sync = True
        try:
            yield
        finally:
            self.sync = False

    def finish(self) -> None:
        """Start what is left (in order), wait for every bucket, and hand the sums to `param.grad`."""
        self.started_in_backward = self.started
        while self.started < len(self.buckets):
            self._start(self.buckets[self.started])
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            counts = bucket.buffer[bucket.offsets[-1] + bucket.params[-1].numel():]
            for p, start, used in zip(bucket.params, bucket.offsets, counts.tolist()):
                grad = bucket.buffer[start:start + p.numel()].view_as(p) if used > 0 else None
                if self.main_grad:
                    p.main_grad = grad
                else:
                    p.grad = grad
            bucket.handle, bucket.ready = None, set()
        self.started, self.sync = 0, False

    def zero(self) -> None:
        """After the optimizer step: empty every bucket for the next step's gradients."""
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
                if self.main_grad:
                    p.main_grad = None
            bucket.buffer.zero_()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
