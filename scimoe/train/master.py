"""Mixed precision like a distributed optimizer: bf16 weights on the device, fp32 master weights and AdamW
moments sharded over the ranks that share a gradient, optionally kept in host memory and stepped by DeepSpeed.

Tested by `python -m pytest tests/train/test_master.py tests/distributed/test_master_parity.py`; measured by
`python benchmarks/memory_modes.py`. Used when `train.dtype=bf16` or `train.optimizer_offload=cpu`
(docs/design.md says why this is ours and not megatron-core's DistributedOptimizer).

- The model's matrices are cast to bf16 once, after the masters were taken from their fp32 values; the router,
  the FoPE tables and every vector (norms, biases) stay fp32 (a few MB at 1T, and the router's softmax and the
  rotation tables are where bf16 rounding would change routing and positions).
- Gradients accumulate over micro-batches in the gradient buckets' flat buffers (`parallel.grad_reduce_dtype`,
  fp32 by default, as megatron's `accumulate_allreduce_grads_in_fp32`), exposed as `param.main_grad`.
- Each reduction group's parameters (dense over dp, expert shards over expert-dp) are dealt out whole to the
  group's ranks, largest first to the least loaded (ZeRO-1's partition; `parallel.zero=0`: every rank owns all).
  A rank keeps the fp32 master and the moments of what it owns, steps them with torch's AdamW, or with
  DeepSpeed's CPU Adam in host memory under offload, and every owner then broadcasts its updated weights, cast
  to the parameter's dtype, to the group: the "param gather".
- `param.master` links a parameter to its master (None: owned by another rank), so checkpoints save and load
  the fp32 masters in the usual single-process format and any layout or option resumes from them.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from scimoe.config import ConfigError, TrainConfig
from scimoe.parallel.grad_buckets import param_grad
from scimoe.train.optim import lr_at, param_groups

STATE_FIELDS = ("step", "exp_avg", "exp_avg_sq")


def keeps_fp32(name: str, param: nn.Parameter) -> bool:
    """Parameters that stay fp32 under bf16 training: the router, the FoPE tables and every vector."""
    return param.ndim < 2 or ".router." in f".{name}" or name.startswith("rotary.") or ".rotary." in name


def cast_to_bf16(model: nn.Module) -> None:
    """The model's matrices to bf16 in place (same Parameter objects, so hooks and optimizers stay attached)."""
    for name, p in model.named_parameters():
        if not keeps_fp32(name, p) and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)


def partition(params: list[nn.Parameter], ranks: int) -> list[int]:
    """Owner (0..ranks-1) of each parameter: largest first to the least loaded rank, ties to the lowest."""
    owner, load = [0] * len(params), [0] * ranks
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + params[i].numel()
    return owner


def load_cpu_adam():
    """Build (first call: DeepSpeed compiles it with the host's C++ compiler, about a minute) and load the
    cpu_adam op; `make setup` calls this once so no run or test pays for it."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return CPUAdamBuilder().load()


def cpu_adam_available() -> bool:
    """Whether DeepSpeed's cpu_adam op builds and loads here (tests that need it skip, saying so, when not)."""
    try:
        load_cpu_adam()
    except Exception as err:  # noqa: BLE001 - any build or load failure means: not available
        logging.getLogger("scimoe").info("DeepSpeed's cpu_adam op is not available here: %s", err)
        return False
    return True


class MasterOptimizer:
    """AdamW on fp32 masters of this rank's share of the parameters; the interface of train/optim.py's
    OptimizerSet (set_lr, step, zero_grad, owned_parameters, parameter_states, set_parameter_state)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, shards: list[tuple[list[nn.Parameter], object]],
                 offload: bool = False) -> None:
        self.offload = offload
        self.lr = lr_at(0, cfg)
        self.gathers: list[tuple[object, int, list[list[nn.Parameter]]]] = []
        """Per reduction group: (group or None, this rank's index, the parameters each rank owns)."""
        owned: set[int] = set()
        for params, group in shards:
            trained = [p for p in params if p.requires_grad]
            size = dist.get_world_size(group) if group is not None else 1
            me = dist.get_rank(group) if group is not None else 0
            owners = partition(trained, size)
            self.gathers.append((group, me, [[p for p, o in zip(trained, owners) if o == r] for r in range(size)]))
            owned.update(id(p) for p, o in zip(trained, owners) if o == me)
        self.masters: dict[int, torch.Tensor] = {}
        device = torch.device("cpu") if offload else None
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if id(p) in owned:
                master = p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                self.masters[id(p)] = master
            p.master = self.masters.get(id(p))
        self.params = {id(p): p for p in model.parameters() if id(p) in owned}
        groups = []
        for g in param_groups(model, cfg.weight_decay):
            masters = [self.masters[id(p)] for p in g["params"] if id(p) in owned]
            if masters:
                groups.append(dict(g, params=masters))
        kwargs = dict(lr=self.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            try:
                self.inner = DeepSpeedCPUAdam(groups or [{"params": []}], adamw_mode=True, **kwargs)
            except RuntimeError as err:
                raise ConfigError(f"config error at 'train.optimizer_offload': DeepSpeed's cpu_adam op could not be "
                                  f"built or loaded ({err.__cause__ or err}); it needs a C++ compiler (g++) and ninja: "
                                  "run `make setup`, or set train.optimizer_offload=none") from err
        else:
            self.inner = torch.optim.AdamW(groups or [{"params": []}], foreach=True, **kwargs)

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.inner.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the owned masters (fp32 gradients: the bucket's slice itself, or a copy to the host under
        offload), then every owner's new weights to its group."""
        for key, p in self.params.items():
            g = param_grad(p)
            master = self.masters[key]
            master.grad = None if g is None else g.to(device=master.device, dtype=torch.float32).view_as(master)
        self.inner.step()
        for master in self.masters.values():
            master.grad = None
        self._gather()

    def _gather(self) -> None:
        for group, me, by_rank in self.gathers:
            for r, params in enumerate(by_rank):
                if r == me:
                    for p in params:
                        p.data.copy_(self.masters[id(p)])
                if group is None:
                    continue
                for dtype in sorted({p.dtype for p in params}, key=str):  # one broadcast per owner and dtype
                    same = [p.data for p in params if p.dtype == dtype]
                    flat = _flatten_dense_tensors(same) if r == me else \
                        torch.empty(sum(t.numel() for t in same), dtype=dtype, device=same[0].device)
                    dist.broadcast(flat, group=group, group_src=r)
                    if r != me:
                        for t, new in zip(same, _unflatten_dense_tensors(flat, same)):
                            t.copy_(new)

    def zero_grad(self) -> None:
        for master in self.masters.values():
            master.grad = None

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.inner]

    def owned_parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def parameter_states(self) -> list[tuple[nn.Parameter, dict[str, torch.Tensor]]]:
        """(parameter, step / exp_avg / exp_avg_sq) as torch's AdamW keeps them (DeepSpeed's int step as a
        float tensor), so a checkpoint does not depend on which optimizer wrote it."""
        out = []
        for key, p in self.params.items():
            state = self.inner.state.get(self.masters[key])
            if state:
                out.append((p, {f: state[f] if torch.is_tensor(state[f]) else torch.tensor(float(state[f]))
                                for f in STATE_FIELDS}))
        return out

    def set_parameter_state(self, param: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
        if id(param) not in self.params:
            raise KeyError("parameter is not stepped by this rank's optimizer")
        master = self.masters[id(param)]
        state = {f: t.to(master.device) if f != "step" else t for f, t in state.items()}
        if self.offload:  # DeepSpeed's op counts steps in a Python int
            state["step"] = int(state["step"])
        self.inner.state[master] = state
