"""The planner against what jobs allocate: `python -m pytest tests/plan/test_memory_plan.py`.

Parameters, gradients and AdamW state must equal the measured bytes exactly on every rank; activations
(bytes autograd saves for one micro-batch) and the peak of a whole step (torch's MemTracker) within 10%. One process here; the 2- and 4-rank
layouts run in the parity launches (tests/distributed/test_parity.py calls `assert_memory_matches`).
"""
from __future__ import annotations

from scimoe.config import CheckpointConfig, Config, DataConfig, LoggerConfig, ModelConfig, MoEConfig, TrainConfig
from tests.distributed.memory_check import measure
from scimoe.parallel.dims import ParallelDims
from scimoe.train.master import cpu_adam_available

ACTIVATION_TOLERANCE = 0.1
PEAK_TOLERANCE = 0.1
"""The step's peak under mixed precision (gradient buckets always exist). fp32 layouts whose parameters have no
data-parallel buckets (dp = 1, or experts with expert-dp = 1) allocate each gradient as the backward frees
activations, while the planner counts them side by side: an upper bound, measured up to 17% above."""
FP32_PEAK_TOLERANCE = 0.2


def memory_config(tp: int = 1, pp: int = 1, ep: int = 1, zero: int = 1, sp: bool = False, world: int = 1,
                  dense_layers: int = 0, etp: int = 1, recompute: str = "none", dtype: str = "fp32",
                  offload: str = "none", grad_reduce: str = "fp32", cp: int = 1) -> Config:
    """A tiny run whose step is one micro-batch per rank (so one forward's saved bytes are measurable)."""
    dp = world // (tp * pp * cp)
    cfg = Config(model=ModelConfig(moe=MoEConfig(dense_layers=dense_layers, dense_ffn_hidden=96 if dense_layers else 0)),
                 train=TrainConfig(steps=1, global_batch=2 * dp, micro_batch=2, seq_len=64),
                 data=DataConfig(source="synthetic", synthetic_rows=32), checkpoint=CheckpointConfig(resume="never"),
                 logger=LoggerConfig(kind="none"))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.zero, cfg.parallel.etp = tp, pp, ep, zero, etp
    cfg.parallel.cp = cp
    cfg.parallel.sequence_parallel = sp
    cfg.train.recompute, cfg.train.dtype, cfg.train.optimizer_offload = recompute, dtype, offload
    cfg.parallel.grad_reduce_dtype = grad_reduce
    return cfg


def assert_memory_matches(name: str, ranks: list[dict]) -> None:
    for rank, m in enumerate(ranks):
        for kind in ("params", "grads", "optimizer", "host"):
            assert m[kind] == m[f"planned_{kind}"], (name, rank, kind, m)
        ratio = m["planned_activations"] / m["activations"]
        assert abs(ratio - 1) < ACTIVATION_TOLERANCE, (name, rank, ratio, m)
        ratio = m["planned_peak"] / m["peak"]  # the step's peak (tests/distributed/memory_check.py)
        assert abs(ratio - 1) < (PEAK_TOLERANCE if m["mixed"] else FP32_PEAK_TOLERANCE), (name, rank, "peak", ratio, m)


def test_one_process_allocates_what_the_planner_says(tmp_path):
    for dense_layers in (0, 1):
        cfg = memory_config(dense_layers=dense_layers)
        assert_memory_matches(f"single dense={dense_layers}", [measure(cfg, ParallelDims(), str(tmp_path))])


def test_recomputation_saves_what_the_planner_says(tmp_path):
    measured = {}
    for mode in ("none", "selective", "full"):
        measured[mode] = measure(memory_config(dense_layers=1, recompute=mode), ParallelDims(), str(tmp_path))
        assert_memory_matches(f"single recompute={mode}", [measured[mode]])
    assert measured["full"]["activations"] < 0.25 * measured["none"]["activations"]
    assert measured["selective"]["activations"] < 0.9 * measured["none"]["activations"]


def test_bf16_masters_and_offload_allocate_what_the_planner_says(tmp_path):
    """bf16 weights, fp32 masters and buckets (fp32 or bf16), offload; every recompute mode, activations within
    ACTIVATION_TOLERANCE (the distributed launches add sharded layouts)."""
    variants = [dict(dtype="bf16", recompute=mode, dense_layers=1) for mode in ("none", "selective", "full")]
    variants += [dict(dtype="bf16", grad_reduce="bf16")]
    if cpu_adam_available():  # the offload variants below step with DeepSpeed's cpu_adam (test_offload_* say why not)
        variants += [dict(dtype="bf16", offload="cpu", recompute="selective"), dict(offload="cpu")]
    for variant in variants:
        m = measure(memory_config(**variant), ParallelDims(), str(tmp_path))
        assert_memory_matches(f"single {variant}", [m])
        if variant.get("offload"):
            assert m["optimizer"] == 0 and m["host"] > 0, m
