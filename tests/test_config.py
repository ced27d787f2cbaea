"""Config errors fail fast and name the key: `python -m pytest tests/test_config.py`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from scimoe.config import register_configs, validate
from scimoe.run_dir import register_resolvers
from scimoe.registry import resolve_target

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compose(*overrides: str):
    register_configs()
    register_resolvers()
    with initialize_config_module(config_module="scimoe.configs", version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


def test_defaults_compose_to_the_tiny_preset():
    cfg = _compose()
    assert cfg.model.name == "tiny" and cfg.model.moe.router_mode == "ste" and cfg.logger.kind == "jsonl"


def test_presets_and_groups_are_selectable():
    cfg = _compose("model=intern_s1_pro", "logger=wandb", "data=synthetic", "train.steps=7")
    assert (cfg.model.hidden, cfg.model.moe.num_experts, cfg.model.moe.n_groups) == (4096, 512, 8)
    assert cfg.logger.kind == "wandb" and cfg.data.source == "synthetic" and cfg.train.steps == 7


def test_unknown_key_is_refused_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("train.stepz=5")
    assert "train.stepz" in str(err.value) or "stepz" in str(err.value.__cause__)


def test_wrong_type_is_refused_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("train.steps=fifty")
    text = f"{err.value} {err.value.__cause__}"
    assert "train.steps" in text


def test_top_k_not_divisible_by_groups_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"model\.moe\.top_k.*divisible by n_groups"):
        _compose("model.moe.top_k=6", "model.moe.n_groups=4")


def test_cli_stops_before_any_work_on_a_bad_value(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scimoe.train", "model.moe.top_k=6", f"hydra.run.dir={run}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.moe.top_k" in proc.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("+train.stepz=1000", "config error at 'train.stepz' (override '+train.stepz=1000'): unknown key; did you mean "
                          "'train.steps'?"),
    ("+model.moe.num_expert=8", "config error at 'model.moe.num_expert' (override '+model.moe.num_expert=8'): "
                                "unknown key; did you mean 'model.moe.num_experts'?"),
    ("train.stepz=5", "config error at 'train.stepz' (override 'train.stepz=5')"),
    ("model.moe.ffn_hidden=-64", "config error at 'model.moe.ffn_hidden' (override 'model.moe.ffn_hidden=-64'): must "
                                 "be positive, got -64"),
    ("model.vision.heads=0", "config error at 'model.vision.heads' (override 'model.vision.heads=0'): must be positive"),
    ("grpo.clip_low=1.5", "config error at 'grpo.clip_low' (override 'grpo.clip_low=1.5')"),
    ("train.steps=[", "cannot parse the override 'train.steps=['"),
    ("train.steps=abc", "config error at 'train.steps' (override 'train.steps=abc')"),
    ("model=nope", "config error at 'model' (override 'model=nope')"),
])
def test_every_bad_override_is_refused_naming_it(override, message):
    from scimoe.config import ConfigError
    from scimoe.train.overrides import check_command_line

    with pytest.raises(ConfigError) as err:
        check_command_line([override, "hydra.run.dir=x"])
    assert message in str(err.value)


@pytest.mark.parametrize("override", ["+train.stepz=1000", "data.source=os.system", "train.steps=["])
def test_cli_config_errors_exit_2_without_a_traceback(tmp_path, override):
    proc = subprocess.run([sys.executable, "-m", "scimoe.train", override, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"(override '{override}')" in proc.stderr or f"override '{override}'" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_repeated_key_is_blamed_on_the_override_hydra_applied():
    from scimoe.config import ConfigError
    from scimoe.train.overrides import check_command_line

    with pytest.raises(ConfigError) as err:
        check_command_line(["train.steps=2", "train.steps=abc", "hydra.run.dir=x"])
    assert "(override 'train.steps=abc')" in str(err.value)


def test_registry_resolves_aliases_and_allowed_paths_only(monkeypatch):
    assert resolve_target("text", "data.source", {"text": "scimoe.data.text.text_rows"}).__name__ == "text_rows"
    with pytest.raises(ValueError, match=r"data\.source.*os\.system"):
        resolve_target("os.system", "data.source")
    monkeypatch.setenv("SCIMOE_ALLOWED_TARGETS", "collections")
    assert resolve_target("collections.OrderedDict", "x")(a=1) == {"a": 1}
    monkeypatch.delenv("SCIMOE_ALLOWED_TARGETS")
    with pytest.raises(ValueError, match=r"'x'.*collections\.OrderedDict"):
        resolve_target("collections.OrderedDict", "x")


def test_run_id_is_shared_by_ranks_of_one_launch():
    from scimoe.run_dir import run_id

    assert run_id({"SLURM_JOB_ID": "42"}) == "slurm-42"
    assert run_id({"TORCHELASTIC_RUN_ID": "abc"}) == "torchrun-abc"
    # Two "ranks" of one standalone torchrun, started seconds apart under one parent, share the parent's
    # start time as their id (each one's own clock would give two different ids).
    child = "from scimoe.run_dir import run_id; print(run_id())"
    script = (f"sleep 1.5; LOCAL_RANK=0 {sys.executable} -c '{child}'; sleep 1.5; "
              f"LOCAL_RANK=1 {sys.executable} -c '{child}'; true")  # `true`: bash must not exec the last one
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "LOCAL_RANK")}
    out = subprocess.run(["bash", "-c", script], env=dict(env, TORCHELASTIC_RUN_ID="none", PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=120)
    first, second = out.stdout.split()
    assert first == second, (first, second)
    assert first != run_id({})  # not "now": the parent started at least 3 s ago
