"""bf16 weights with fp32 masters, and the optimizer offloaded to DeepSpeed's CPU Adam, on one process:
`python -m pytest tests/train/test_master.py` (the 4-rank layouts: tests/distributed/test_master_parity.py)."""
from __future__ import annotations

import pytest
import torch

from scimoe.config import ConfigError, compose_config
from scimoe.data.loader import StepLoader
from scimoe.data.sources import build_rows, data_source
from scimoe.model import build_model
from scimoe.checkpoint import contents, shards, storage
from scimoe.train.pretrain import pretrain
from scimoe.train.session import Session
from scimoe.train.step import autocast, train_step
from scimoe.train.master import cpu_adam_available
from tests.distributed.parity_config import parity_config

needs_cpu_adam = pytest.mark.skipif(not cpu_adam_available(), reason="DeepSpeed's cpu_adam op did not build here "
                                    "(needs g++ and ninja; `make setup` builds it)")


def _cfg(steps: int = 10, **train):
    cfg = parity_config(micro_batch=4)  # two micro-batches a step: gradients accumulate
    cfg.train.steps = steps
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _losses(run) -> list[float]:
    return [r["loss"] for r in run.records]


def checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor of a checkpoint as the single-process tensor."""
    out = {}
    for kind in ("model", "optimizer"):
        index = shards.ShardIndex(contents.files(path, kind))
        out.update({f"{kind}/{name}": index.full(name) for name in index.names()})
    return out


def resave(cfg, run_dir: str, source: str) -> str:
    """Resume `source` into `cfg`'s options and save straight away: what the new run holds, in the file format."""
    cfg.checkpoint.resume = source
    with Session(cfg, run_dir) as session:
        state = session.resume()
        session.save(state["step"], state["loader"])
    return storage.step_dir(run_dir, state["step"])


@needs_cpu_adam
def test_offloaded_deepspeed_adam_follows_torch_adamw_for_ten_steps(tmp_path):
    reference = pretrain(_cfg(), str(tmp_path / "torch"))
    offloaded = pretrain(_cfg(optimizer_offload="cpu"), str(tmp_path / "offload"))
    assert len(_losses(offloaded)) == 10
    # DeepSpeed's vectorised kernel rounds a few ulps differently per update; nothing else may differ.
    for got, want in zip(_losses(offloaded), _losses(reference)):
        assert got == pytest.approx(want, rel=1e-6)
    assert _losses(offloaded) != _losses(reference)  # it really is another optimizer


def test_bf16_keeps_matrices_in_bf16_and_fp32_masters_that_the_weights_follow(tmp_path):
    cfg = _cfg(steps=2, dtype="bf16")
    with Session(cfg, str(tmp_path / "fresh")) as session:
        named = dict(session.model.named_parameters())
        experts = next(p for n, p in named.items() if n.endswith("experts.gate_up_proj"))
        router = next(p for n, p in named.items() if n.endswith("router.weight"))
        assert experts.dtype == torch.bfloat16 and router.dtype == torch.float32
        assert named["norm.weight"].dtype == torch.float32
        assert experts.master.dtype == torch.float32 and torch.equal(experts.master.bfloat16(), experts.detach())
        assert not torch.equal(experts.master, experts.detach().float())  # the masters keep the fp32 init
    assert len(pretrain(cfg, str(tmp_path / "run")).records) == 2
    cfg.checkpoint.resume = "auto"
    with Session(cfg, str(tmp_path / "run")) as session:  # the finished run, reloaded
        session.resume()
        for name, p in session.model.named_parameters():
            assert p.master is not None and p.master.dtype == torch.float32, name
            assert torch.equal(p.master.to(p.dtype), p.detach()), name  # the param gather
        states = session.optimizer.parameter_states()
        assert states and all(s["exp_avg"].dtype == torch.float32 for _, s in states)


@pytest.mark.parametrize("reduce_dtype", ["fp32", "bf16"])
def test_bf16_gradients_accumulate_in_the_bucket_dtype(tmp_path, reduce_dtype):
    cfg = _cfg(steps=1, dtype="bf16")
    cfg.parallel.grad_reduce_dtype = reduce_dtype
    seen = {}
    with Session(cfg, str(tmp_path)) as session:
        model = session.model
        finish = session.buckets.finish

        def record():
            finish()
            seen.update({n: p.main_grad.dtype for n, p in model.named_parameters() if p.main_grad is not None})
        session.buckets.finish = record
        loader = StepLoader(build_rows(cfg, str(tmp_path), data_source(cfg)), cfg.train.global_batch,
                            cfg.train.micro_batch, cfg.train.seed, 0, 1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_step(model, session.optimizer, loader.next_step(), cfg.train.grad_clip, cfg.train.dtype,
                   buckets=session.buckets)
        assert all(p.grad is None for p in model.parameters())  # the buffer is the gradient memory
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    want = torch.float32 if reduce_dtype == "fp32" else torch.bfloat16
    assert seen and set(seen.values()) == {want}


def test_bf16_weights_are_not_copied_for_the_backward():
    """Autograd keeps expert weights themselves, never a cast copy (fp32 weights under autocast did: the control)."""
    def expert_copies(bf16_weights: bool) -> int:
        cfg = _cfg(dtype="bf16").model
        model = build_model(cfg, seed=0)
        if bf16_weights:
            from scimoe.train.master import cast_to_bf16
            cast_to_bf16(model)
        weights = [p for n, p in model.named_parameters() if ".experts." in n]
        shapes = {tuple(w.shape) for w in weights}
        ptrs = {w.data_ptr() for w in weights}
        copies = []

        def pack(t):
            if tuple(t.shape) in shapes and t.data_ptr() not in ptrs:
                copies.append(t.shape)
            return t
        ids = torch.randint(0, cfg.vocab_size, (2, 32))
        pos = torch.arange(32).expand(2, 32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("bf16"):
            model(ids, pos, ids)
        return len(copies)

    assert expert_copies(bf16_weights=False) > 0
    assert expert_copies(bf16_weights=True) == 0


def test_bf16_checkpoints_hold_the_fp32_masters_and_resume_into_fp32_exactly(tmp_path):
    pretrain(_cfg(steps=3, dtype="bf16"), str(tmp_path / "bf16"))
    saved = storage.step_dir(str(tmp_path / "bf16"), 3)
    tensors = checkpoint_tensors(saved)
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if not k.endswith("::step")), \
        sorted({str(t.dtype) for t in tensors.values()})
    assert any(not torch.equal(t, t.bfloat16().float()) for k, t in tensors.items() if k.startswith("model/"))
    again = checkpoint_tensors(resave(_cfg(steps=3), str(tmp_path / "fp32"), saved))
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("into", [{"dtype": "bf16"}, pytest.param({"optimizer_offload": "cpu"}, marks=needs_cpu_adam)])
def test_an_fp32_checkpoint_resumes_into_bf16_or_offload_bit_for_bit(tmp_path, into):
    """The other direction of the two tests around this one: fp32 weights become the fp32 masters, the moments
    move as they are."""
    pretrain(_cfg(steps=3), str(tmp_path / "fp32"))
    saved = storage.step_dir(str(tmp_path / "fp32"), 3)
    tensors = checkpoint_tensors(saved)
    again = checkpoint_tensors(resave(_cfg(steps=3, **into), str(tmp_path / "into"), saved))
    assert again.keys() == tensors.keys() and any(k.endswith("::exp_avg_sq") for k in tensors)
    assert [k for k in tensors if not torch.equal(again[k], tensors[k])] == []


@needs_cpu_adam
def test_offload_checkpoint_resumes_without_offload_exactly_where_it_left(tmp_path):
    pretrain(_cfg(steps=3, optimizer_offload="cpu", decay_steps=6), str(tmp_path / "offload"))  # half of 6 steps
    saved = storage.step_dir(str(tmp_path / "offload"), 3)
    again = checkpoint_tensors(resave(_cfg(steps=3), str(tmp_path / "plain"), saved))
    tensors = checkpoint_tensors(saved)
    assert again.keys() == tensors.keys() and any(k.endswith("::exp_avg_sq") for k in tensors)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    # ... and continues like the run that never stopped, to the optimizers' rounding
    whole = pretrain(_cfg(steps=6, optimizer_offload="cpu"), str(tmp_path / "whole"))
    cfg = _cfg(steps=6)
    cfg.checkpoint.resume = saved
    resumed = pretrain(cfg, str(tmp_path / "plain"))
    assert len(resumed.records) == 3
    for got, want in zip(_losses(resumed), _losses(whole)[3:]):
        assert got == pytest.approx(want, rel=1e-6)


def test_mixed_precision_refusals_name_the_key():
    with pytest.raises(ConfigError, match="parallel.grad_reduce_dtype"):
        compose_config(["parallel.grad_reduce_dtype=bf16"])
    with pytest.raises(ConfigError, match="train.optimizer_offload"):
        compose_config(["train.optimizer_offload=nvme"])
