"""`scimoe-plan`: verdicts, suggestions and communication volumes. Run: `python -m pytest tests/plan`."""
from __future__ import annotations

import pytest

from scimoe.config import Config
from scimoe.plan.cli import main, make_plan
from scimoe.plan.memory import plan_memory
from scimoe.plan.step import plan_step

BIG = ["model=intern_s1_pro", "cluster.gpu=h200", "train.seq_len=4096", "train.micro_batch=1",
       "train.global_batch=1024", "train.dtype=bf16"]


def test_a_fitting_layout_is_reported_with_every_memory_term(capsys):
    main(["parallel.tp=4", "parallel.pp=16", "parallel.ep=8", "parallel.sequence_parallel=true", "cluster.gpus=512", *BIG])
    out = capsys.readouterr().out  # returned normally: exit status 0
    for term in ("parameters (bf16)", "gradients (fp32)", "fp32 masters + AdamW (ZeRO-1)", "activations", "train.recompute=none",
                 "all-to-all buffers", ": fits", "MFU"):
        assert term in out, term
    for kind in ("dp", "zero", "tp", "ep", "pp"):
        assert f"\n  {kind} " in out


def test_a_layout_that_does_not_fit_gets_the_smallest_one_that_does(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["parallel.tp=4", "parallel.pp=4", "parallel.ep=8", "cluster.gpus=512", *BIG])
    out = capsys.readouterr().out
    assert stop.value.code == 1
    assert "DOES NOT FIT" in out and "smallest layout that fits: parallel.tp=1 parallel.pp=8 parallel.ep=8" in out


def test_recomputation_shrinks_what_is_saved_and_the_suggestion_uses_it(capsys):
    from scimoe.config import compose_config

    base = compose_config(["parallel.tp=4", "parallel.pp=16", "parallel.ep=8", "cluster.gpus=512", *BIG])
    worst = {mode: plan_memory(compose_config(["parallel.tp=4", "parallel.pp=16", "parallel.ep=8", "cluster.gpus=512",
                                               f"train.recompute={mode}", *BIG]), 512).stages[0]
             for mode in ("none", "selective", "full")}
    assert worst["full"].activation_bytes_per_microbatch < worst["selective"].activation_bytes_per_microbatch \
        < worst["none"].activation_bytes_per_microbatch
    assert worst["none"].recompute_transient_bytes == 0 < worst["selective"].recompute_transient_bytes \
        < worst["full"].recompute_transient_bytes
    assert base.train.recompute == "none"
    # 32 × 8 H100: nothing fits without recomputation; the suggestion says which mode it needs.
    with pytest.raises(SystemExit):
        main(["cluster.gpu=h100", "cluster.gpus=256", *BIG[:1], *BIG[2:]])
    out = capsys.readouterr().out
    assert "smallest layout that fits" in out and "train.recompute=" in out.split("smallest layout that fits")[1]


def test_impossible_layouts_are_named(capsys):
    with pytest.raises(SystemExit):
        main(["parallel.tp=8", "cluster.gpus=512", *BIG])
    assert "parallel.tp (8) must divide model.heads, model.kv_heads" in capsys.readouterr().out


def test_data_parallel_volume_matches_a_hand_count():
    cfg = Config()
    cfg.train.global_batch, cfg.train.micro_batch = 8, 2
    cfg.cluster.gpu, cfg.cluster.gpus = "cpu", 4
    memory = plan_memory(cfg, 4)
    step = plan_step(cfg, memory, 4)
    params = 1_844_480  # the tiny model (tests/model/test_param_count.py; its FoPE tables are buffers)
    assert memory.stages[0].dense_params == params
    assert step.comm_bytes["dp"] == pytest.approx(4 * params * 2 * 3 / 4)  # ring all-reduce of fp32 grads
    assert step.comm_bytes["zero"] == pytest.approx(4 * params * 3 / 4)  # each rank receives 3/4 of the weights
    assert step.comm_bytes["tp"] == step.comm_bytes["ep"] == step.comm_bytes["pp"] == 0
    assert make_plan(cfg).fits()


def test_expert_tensor_parallelism_shrinks_the_expert_data_parallel_group(capsys):
    """tp2 × ep2 × etp2 on 8 GPUs: each expert shard has 8 / (ep · etp · pp) = 2 replicas, so its gradients are
    summed over 2 ranks, not the 4 that tp · dp / ep would give (the planner said 4 before it asked ParallelDims)."""
    cfg = Config()
    cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.etp = 2, 2, 2
    cfg.train.global_batch, cfg.train.micro_batch = 8, 2
    cfg.cluster.gpu, cfg.cluster.gpus = "cpu", 8
    memory = plan_memory(cfg, 8)
    stage = memory.stages[0]
    assert stage.expert_params > 0
    step = plan_step(cfg, memory, 8)
    ring = lambda n: 2 * (n - 1) / n  # noqa: E731
    assert step.comm_bytes["dp"] == pytest.approx(4 * stage.dense_params * ring(4) + 4 * stage.expert_params * ring(2))
    main(["parallel.tp=2", "parallel.ep=2", "parallel.etp=2", "cluster.gpu=cpu", "cluster.gpus=8",
          "train.global_batch=8", "train.micro_batch=2"])
    assert "(expert-dp 2)" in capsys.readouterr().out


def test_context_parallelism_splits_the_rows_activations_and_sends_their_keys_and_values():
    """cp2 holds half the positions (plus the row's K/V during attention) and sends, per layer and micro-batch,
    the all-gather of K and V forward and the all-reduce of their gradients backward: a hand count."""
    def plan(cp: int):
        cfg = Config()
        cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seq_len = 8, 2, 256
        cfg.cluster.gpu, cfg.cluster.gpus, cfg.parallel.cp = "cpu", 4, cp
        memory = plan_memory(cfg, 4)
        return cfg, memory, plan_step(cfg, memory, 4)

    cfg, one, one_step = plan(1)
    _, two, two_step = plan(2)
    m = cfg.model
    kv_row = 2 * m.kv_heads * m.head_dim * 4 * 2 * 256  # K and V of one micro-batch's rows, fp32
    assert two.stages[0].activation_bytes_per_microbatch == pytest.approx(
        one.stages[0].activation_bytes_per_microbatch / 2 + m.layers * kv_row, rel=1e-6)
    assert one_step.comm_bytes["cp"] == 0
    micro = 8 // (2 * 2)  # micro-batches per step: dp 4 = 2 replicas × cp 2
    assert two_step.comm_bytes["cp"] == pytest.approx(micro * m.layers * kv_row * (1 / 2 + 1))
    assert two_step.comm_bytes["tp"] == 0 and two_step.comm_bytes["dp"] == one_step.comm_bytes["dp"]


def test_context_parallelism_is_searched_for_long_rows_and_checked(capsys):
    from scimoe.config import compose_config
    from scimoe.plan.cli import candidates

    long_rows = compose_config(["cluster.gpus=4", "train.seq_len=32768", "model.max_positions=32768",
                                "train.global_batch=4"])
    assert {p.cfg.parallel.cp for p in candidates(long_rows)} == {1, 2, 4}
    short_rows = compose_config(["cluster.gpus=4", "train.seq_len=4096", "train.global_batch=4"])
    assert {p.cfg.parallel.cp for p in candidates(short_rows)} == {1}
    with pytest.raises(SystemExit):
        main(["parallel.cp=4", "cluster.gpus=4", "train.seq_len=36", "train.global_batch=4"])
    assert "train.seq_len (36) must be divisible by 2 × parallel.cp (8)" in capsys.readouterr().out
