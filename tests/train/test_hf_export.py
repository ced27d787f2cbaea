"""HF export/import: `python -m pytest tests/train/test_hf_export.py`.

A trained tiny checkpoint → `scimoe-export` → `scimoe-import` gives back every tensor bit for bit; a
text-only model with RoPE and one router group loads into transformers' Qwen3-MoE classes and gives
our logits; training starts from an imported folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from scimoe.convert import cli, hf
from scimoe.model import build_model
from scimoe.train import checkpoint, shards
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trained(tmp_path, **model_overrides) -> tuple[str, object]:
    cfg = tiny_config(steps=2)
    for key, value in model_overrides.items():
        target = cfg.model.moe if key in ("n_groups", "top_k", "bias_update_rate", "dense_layers", "dense_ffn_hidden") else cfg.model
        setattr(target, key, value)
    cfg.model.zero_init_output = False  # non-trivial logits from the start
    pretrain(cfg, str(tmp_path / "run"))
    return checkpoint.step_dir(str(tmp_path / "run"), 2), cfg


def _state(path: str) -> dict[str, torch.Tensor]:
    index = shards.ShardIndex(checkpoint.files(path, "model"))
    return {name: index.full(name) for name in index.names()}


def test_export_import_round_trip_is_bit_exact(tmp_path):
    path, cfg = _trained(tmp_path, bias_update_rate=1e-2, dense_layers=1, dense_ffn_hidden=96)
    names = cli.export(path, str(tmp_path / "hf"), max_shard_bytes=400_000)
    assert len(names) > 1  # sharded, with an index naming every weight's file
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert "model.language_model.layers.1.mlp.experts.15.down_proj.weight" in index["weight_map"]
    assert "model.language_model.layers.0.mlp.gate_proj.weight" in index["weight_map"]  # the dense layer
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["InternS1ProForConditionalGeneration"]
    assert config["text_config"]["router_n_groups"] == cfg.model.moe.n_groups
    assert config["text_config"]["mlp_only_layers"] == [0]
    imported = cli.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    original, back = _state(path), _state(imported)
    assert original.keys() == back.keys()
    assert any(t.any() for n, t in original.items() if n.endswith("selection_bias"))  # the bias moved
    for name in original:
        assert torch.equal(original[name], back[name]), name
    got = cli.checkpoint_model_config(imported)  # the architecture; training-only settings are not in HF configs
    for key in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "rms_eps", "pos_emb", "rope_theta",
                "max_positions", "fope_init_factor", "fope_sep_head"):
        assert getattr(got, key) == getattr(cfg.model, key), key
    for key in ("num_experts", "top_k", "n_groups", "ffn_hidden", "norm_topk_prob", "dense_layers", "dense_ffn_hidden"):
        assert getattr(got.moe, key) == getattr(cfg.model.moe, key), key


def test_qwen3_moe_transformers_gives_the_same_logits(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    path, cfg = _trained(tmp_path, pos_emb="rope", n_groups=1)
    cli.export(path, str(tmp_path / "hf"), layout="qwen3_moe")
    theirs = Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = build_model(cfg.model)
    ours.load_state_dict(_state(path))
    ours.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids, torch.arange(24).expand(2, 24)).logits
        got = theirs(input_ids=ids).logits
    assert want.abs().max() > 1e-2  # the check means something
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_fope_and_grouped_models_are_refused_for_qwen3_moe_by_name(tmp_path):
    path, _ = _trained(tmp_path)
    with pytest.raises(ValueError, match="pos_emb=rope and model.moe.n_groups=1"):
        cli.export(path, str(tmp_path / "hf"), layout="qwen3_moe")
    assert not (tmp_path / "hf").exists()


def test_training_starts_from_an_imported_folder_through_the_command_line_tools(tmp_path):
    path, cfg = _trained(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", "from scimoe.convert.cli import export_main; export_main()",
                          path, str(tmp_path / "hf")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", "from scimoe.convert.cli import import_main; import_main()",
                          str(tmp_path / "hf"), str(tmp_path / "imported")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "checkpoint.init_weights=" in out.stdout and "model.moe.num_experts=16" in out.stdout
    start = checkpoint.step_dir(str(tmp_path / "imported"), 0)
    with pytest.raises(ValueError, match="weights only"):
        checkpoint.load(start, build_model(cfg.model), None)
    fresh = tiny_config(steps=2)
    fresh.checkpoint.init_weights = start
    with pytest.raises(ValueError, match="data.tokenizer"):  # the weights' tokenizer must come with them
        pretrain(fresh, str(tmp_path / "no_tokenizer"))
    fresh.data.tokenizer = str(tmp_path / "run" / "tokenizer.json")
    from_import = pretrain(fresh, str(tmp_path / "finetune")).records
    # The same as starting from the trained weights in memory, and not like a fresh start.
    same_data = tiny_config(steps=2)
    same_data.data.tokenizer = fresh.data.tokenizer
    direct = pretrain(same_data, str(tmp_path / "direct"), initial_state=_state(path)).records
    scratch = pretrain(tiny_config(steps=2), str(tmp_path / "scratch")).records
    assert [r["loss"] for r in from_import] == [r["loss"] for r in direct]
    assert from_import[0]["loss"] != scratch[0]["loss"]


def test_bad_folders_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        cli.import_hf(str(tmp_path), str(tmp_path / "out"))
    path, _ = _trained(tmp_path)
    cli.export(path, str(tmp_path / "hf"))
    shard = next(p for p in os.listdir(tmp_path / "hf") if p.endswith(".safetensors"))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "hf" / shard))
    weights.pop(next(k for k in weights if ".experts.3." in k))
    save_file(weights, str(tmp_path / "hf" / shard))
    with pytest.raises(ValueError, match="present for 15 of 16 experts"):
        cli.import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    assert hf.LAYOUTS == ("intern_s1_pro", "qwen3_moe")
