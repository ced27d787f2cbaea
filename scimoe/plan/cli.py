"""`scimoe-plan`: will a layout fit, what will it send, how fast will it run.

Run: `scimoe-plan model=intern_s1_pro parallel.tp=8 parallel.pp=8 parallel.ep=8 cluster.gpus=512 cluster.gpu=h200
train.seq_len=8192 train.micro_batch=1 train.global_batch=1024` (any scimoe-train override). Prints per-GPU
memory (parameters, gradients, ZeRO-1-sharded AdamW state, activations per micro-batch under
train.recompute, all-to-all buffers), communication per step by kind, and the estimated step time and
MFU; when the layout does not fit it says so and suggests the smallest layout that does: the fewest
model-parallel GPUs (tp·pp·ep·cp; cp searched for rows of 32k tokens and more) under any train.recompute mode and train.optimizer_offload choice, then the
fastest of those. Tested by `python -m pytest tests/plan`.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace

from scimoe.config import Config, compose_config
from scimoe.hardware import ACCELERATORS
from scimoe.parallel.dims import ParallelDims
from scimoe.plan.memory import GIB, MemoryPlan, layout, plan_memory
from scimoe.plan.step import StepPlan, plan_step

HEADROOM = 0.9  # leave 10% of device memory to the allocator, NCCL and fragmentation


@dataclass
class Plan:
    cfg: Config
    world: int
    memory: MemoryPlan
    step: StepPlan

    @property
    def capacity_bytes(self) -> float:
        return ACCELERATORS[self.cfg.cluster.gpu].memory_gib * GIB * HEADROOM

    def fits(self) -> bool:
        """Device memory within HEADROOM, and offloaded optimizer state within the host's share per GPU."""
        host = max((max(s.host_bytes_per_rank) for s in self.memory.stages if s.host_bytes_per_rank), default=0)
        return self.memory.worst().total() <= self.capacity_bytes and \
            host <= ACCELERATORS[self.cfg.cluster.gpu].host_gib_per_gpu * GIB * HEADROOM


def check_layout(cfg: Config, world: int) -> ParallelDims:
    """The layout's dims, or ValueError naming what does not divide."""
    m, par = cfg.model, cfg.parallel
    dims = layout(cfg, world)
    dims.check_model(m.moe.num_experts, m.layers, m.moe.n_groups)
    dims.check_sequence(cfg.train.seq_len)
    if m.heads % par.tp or m.kv_heads % par.tp or m.vocab_size % par.tp:
        raise ValueError(f"parallel.tp ({par.tp}) must divide model.heads, model.kv_heads and model.vocab_size")
    per_step = cfg.train.micro_batch * dims.data_parallel
    if cfg.train.global_batch % per_step:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) is not a multiple of train.micro_batch × "
                         f"data-parallel size ({per_step})")
    return dims


def make_plan(cfg: Config) -> Plan:
    world = cfg.cluster.gpus
    check_layout(cfg, world)
    memory = plan_memory(cfg, world)
    return Plan(cfg, world, memory, plan_step(cfg, memory, world))


CONTEXT_FROM = 32768
"""Rows at least this long also try context parallelism (cp 2 to 16) in the search; shorter ones keep cp as given."""


def refusal_key(err: Exception) -> str:
    """What refused a layout: `cluster.gpus` when its sizes do not divide the world, else the config key its error
    names first (what to change), e.g. `train.global_batch`."""
    if str(err).startswith("world size"):
        return "cluster.gpus"
    found = re.search(r"\b((?:parallel|train|model|cluster)\.[a-z_.]+[a-z_])", str(err))
    return found.group(1) if found else str(err)


def candidates(cfg: Config, refused: Counter | None = None) -> list[Plan]:
    """Every valid (tp, pp, ep, cp) on cluster.gpus, tp within a node; each refused one is counted in `refused`
    under the key its error names first."""
    plans = []
    tps = [t for t in (1, 2, 4, 8) if t <= cfg.cluster.gpus_per_node]
    cps = (1, 2, 4, 8, 16) if cfg.train.seq_len >= CONTEXT_FROM else (cfg.parallel.cp,)
    for tp, pp, ep, sp, cp in itertools.product(tps, (1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 32, 64), (False, True),
                                                cps):
        if sp and tp == 1:
            continue
        trial = replace(cfg, parallel=replace(cfg.parallel, tp=tp, pp=pp, ep=ep, sequence_parallel=sp, cp=cp))
        try:
            plans.append(make_plan(trial))
        except ValueError as err:
            if refused is not None:
                refused[refusal_key(err)] += 1
    return plans


def suggest(cfg: Config, fastest: bool = False, refused: Counter | None = None) -> Plan | None:
    """The layout with the fewest model-parallel GPUs (tp·pp·ep·cp) that fits under any recomputation mode and
    offload choice, then the fastest of those (its train.recompute and train.optimizer_offload say which);
    `fastest`: the fitting layout with the shortest estimated step. Layouts refused outright are counted into
    `refused` by the key that refused them."""
    fitting = []
    for mode, offload in itertools.product(("none", "selective", "full"), ("none", "cpu")):
        train = replace(cfg.train, recompute=mode, recompute_layers=None, optimizer_offload=offload)
        fitting += [p for p in candidates(replace(cfg, train=train), refused) if p.fits()]
    if not fitting:
        return None
    if fastest:
        return min(fitting, key=lambda p: p.step.step_s)
    return min(fitting, key=lambda p: (p.cfg.parallel.tp * p.cfg.parallel.pp * p.cfg.parallel.ep * p.cfg.parallel.cp,
                                       p.step.step_s))


def _overrides(plan: Plan) -> str:
    p, t = plan.cfg.parallel, plan.cfg.train
    return (f"parallel.tp={p.tp} parallel.pp={p.pp} parallel.ep={p.ep} parallel.cp={p.cp} "
            f"parallel.sequence_parallel={p.sequence_parallel} "
            f"train.recompute={t.recompute} train.optimizer_offload={t.optimizer_offload}")


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def describe(plan: Plan) -> str:
    cfg, par = plan.cfg, plan.cfg.parallel
    dims = check_layout(cfg, plan.world)
    worst = plan.memory.worst()
    gpu = ACCELERATORS[cfg.cluster.gpu]
    act = worst.activation_bytes_per_microbatch
    bf16 = cfg.train.dtype == "bf16"
    mixed = bf16 or cfg.train.optimizer_offload != "none"
    grads = cfg.parallel.grad_reduce_dtype if mixed else "fp32"
    state = ("fp32 masters + AdamW" if mixed else "AdamW state") + (" (ZeRO-1)" if par.zero else " (unsharded)")
    host = max(worst.host_bytes_per_rank) if worst.host_bytes_per_rank else 0
    lines = [
        f"{cfg.model.name} on {plan.world} × {cfg.cluster.gpu} ({cfg.cluster.nodes} node(s)), layout "
        f"{dims.describe().rsplit(' rank', 1)[0]} (expert-dp {dims.expert_dp}), "
        f"{cfg.train.global_batch} × {cfg.train.seq_len} tokens per step, micro-batch {cfg.train.micro_batch}, {cfg.train.dtype}",
        f"memory per GPU, fullest stage {worst.stage} (layers {worst.layers.start}-{worst.layers.stop - 1}):",
        f"  parameters ({'bf16' if bf16 else 'fp32'})           {_gib(worst.params_bytes)}   "
        f"({(worst.dense_params + worst.expert_params) / 1e9:.2f}B, {worst.expert_params / 1e9:.2f}B of them experts)",
        f"  gradients ({grads})            {_gib(worst.grads_bytes)}   (the bucket buffers)",
        f"  {state:<27} {_gib(worst.optimizer_bytes)}"
        + (f"   (offloaded: {host / GIB:.2f} GiB of host memory per GPU)" if host else ""),
        f"  activations                 {_gib(act * worst.microbatches_in_flight)}   "
        f"({_gib(act).strip()} per micro-batch × {worst.microbatches_in_flight} in flight; "
        f"train.recompute={cfg.train.recompute})",
        *([f"  recomputed in the backward  {_gib(worst.recompute_transient_bytes)}   (one block at a time)"]
          if cfg.train.recompute != "none" else []),
        f"  all-to-all buffers          {_gib(worst.alltoall_buffer_bytes)}",
        f"  optimizer step temporaries  {_gib(worst.step_transient_bytes)}   (after the backward: the peak takes the "
        f"larger of this and the three lines above)",
        f"  total                       {_gib(worst.total())}   of {gpu.memory_gib:.0f} GiB ({HEADROOM:.0%} usable): "
        + ("fits" if plan.fits() else "DOES NOT FIT"),
        "communication per GPU per step:",
        *(f"  {kind:<5} {volume / 1e9:10.2f} GB  {plan.step.comm_s[kind]:8.3f} s" for kind, volume in plan.step.comm_bytes.items()),
        f"estimated step: compute {plan.step.compute_s:.3f} s, pipeline bubble {plan.step.bubble:.1%}, "
        f"communication {sum(plan.step.comm_s.values()):.3f} s → {plan.step.step_s:.3f} s/step, "
        f"{plan.step.tokens_per_s:,.0f} tokens/s, MFU {plan.step.mfu:.1%}",
    ]
    return "\n".join(lines)


def no_fit_message(cfg: Config, refused: Counter) -> str:
    """Why no layout was found: what refused the layouts whose sizes divide the GPUs (the most frequent first),
    else memory."""
    where = f"no layout fits on {cfg.cluster.gpus} × {cfg.cluster.gpu}"
    undivided = refused.pop("cluster.gpus", 0)
    if not refused:
        if undivided and not sum(refused.values()):
            return f"{where}: no tried layout's tp × pp × ep × cp divides {cfg.cluster.gpus}: change cluster.gpus"
        return (f"{where}, even with full recomputation and optimizer offload: more GPUs or a smaller micro-batch / "
                "sequence are needed")
    reasons = ", ".join(f"{key} ({n})" for key, n in refused.most_common())
    key = refused.most_common(1)[0][0]
    hint = (f": train.global_batch={cfg.train.global_batch} must be a multiple of train.micro_batch × the "
            f"data-parallel size, so change train.global_batch or cluster.gpus" if key == "train.global_batch" else "")
    return (f"{where}: {sum(refused.values())} layouts whose sizes divide {cfg.cluster.gpus} GPUs were refused by "
            f"{reasons} ({undivided} others do not divide them); the first to change is {key}{hint}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scimoe-plan", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for scimoe-train")
    args = parser.parse_args(argv)
    try:
        cfg = compose_config(args.overrides)
    except Exception as err:  # noqa: BLE001 (Hydra's and our config errors alike)
        print(f"scimoe-plan: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        plan = make_plan(cfg)
        print(describe(plan))
        ok = plan.fits()
    except ValueError as err:
        print(f"scimoe-plan: layout not possible: {err}")
        ok = False
    if not ok:
        refused: Counter = Counter()
        found = suggest(cfg, refused=refused)
        if found is None:
            print(no_fit_message(cfg, refused))
        else:
            p = found.cfg.parallel
            print(f"\nsmallest layout that fits: {_overrides(found)}\n" + describe(found))
            quick = suggest(cfg, fastest=True)
            if quick.step.step_s < found.step.step_s:
                print(f"\nfastest layout that fits: {_overrides(quick)} ({quick.step.step_s:.2f} s/step, "
                      f"{quick.memory.worst().total() / GIB:.1f} GiB per GPU)")
        sys.exit(1)


if __name__ == "__main__":
    main()
