"""HF export/import: `python -m pytest tests/train/test_hf_export.py`.

A trained tiny checkpoint → `scimoe-export` → `scimoe-import` gives back every tensor bit for bit; a
text-only model with RoPE and one router group loads into transformers' Qwen3-MoE classes and gives
our logits; training starts from an imported folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from scimoe.checkpoint import hf_layout
from scimoe.convert import cli
from scimoe.model import build_model
from scimoe.checkpoint import contents, shards, storage
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trained(tmp_path, steps: int = 2, **model_overrides) -> tuple[str, object]:
    cfg = tiny_config(steps=steps)
    for key, value in model_overrides.items():
        target = cfg.model.moe if key in ("n_groups", "top_k", "bias_update_rate", "dense_layers", "dense_ffn_hidden") else cfg.model
        setattr(target, key, value)
    cfg.model.zero_init_output = False  # non-trivial logits from the start
    pretrain(cfg, str(tmp_path / "run"))
    return storage.step_dir(str(tmp_path / "run"), steps), cfg


def _state(path: str) -> dict[str, torch.Tensor]:
    index = shards.ShardIndex(contents.files(path, "model"))
    return {name: index.full(name) for name in index.names()}


def test_export_import_round_trip_is_bit_exact(tmp_path):
    path, cfg = _trained(tmp_path, dense_layers=1, dense_ffn_hidden=96)
    names = cli.export(path, str(tmp_path / "hf"), max_shard_bytes=400_000)
    assert len(names) > 1  # sharded, with an index naming every weight's file
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert "model.language_model.layers.1.mlp.experts.15.down_proj.weight" in index["weight_map"]
    assert "model.language_model.layers.0.mlp.gate_proj.weight" in index["weight_map"]  # the dense layer
    assert "model.language_model.rotary_emb.sin_coef" in index["weight_map"]  # FoPE tables, the released names
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["InternS1ProForConditionalGeneration"]
    assert config["text_config"]["router_n_groups"] == cfg.model.moe.n_groups
    assert config["text_config"]["mlp_only_layers"] == [0]
    assert config["text_config"]["rope_theta"] == 5000000 and isinstance(config["text_config"]["rope_theta"], int)
    assert config["text_config"]["rope_scaling"] == {"rope_type": "default", "fope_init_factor": 0.5,
                                                     "fope_sep_head": True, "num_inv_freq": None}
    imported = cli.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    original, back = _state(path), _state(imported)
    assert original.keys() == back.keys()
    for name in original:
        assert torch.equal(original[name], back[name]), name
    got = cli.checkpoint_model_config(imported)  # the architecture; training-only settings are not in HF configs
    for key in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "rms_eps", "pos_emb", "rope_theta",
                "max_positions", "fope_init_factor", "fope_sep_head", "bos_token_id", "eos_token_id", "image_token_id"):
        assert getattr(got, key) == getattr(cfg.model, key), key
    for key in ("num_experts", "top_k", "n_groups", "ffn_hidden", "norm_topk_prob", "dense_layers", "dense_ffn_hidden"):
        assert getattr(got.moe, key) == getattr(cfg.model.moe, key), key


def test_all_three_towers_go_out_and_come_back_under_the_released_names(tmp_path):
    from scimoe.config import compose_config

    cfg = compose_config(["model=tiny_mm", "model.zero_init_output=false"])
    model = build_model(cfg.model, seed=5)
    state = {k: v for k, v in model.state_dict().items()}
    entries = {k: (k, t, shards.placement(t, None)) for k, t in state.items()}
    from omegaconf import OmegaConf

    start = contents.write(str(tmp_path / "run"), 3, entries, None, None, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    cli.export(start, str(tmp_path / "hf"))
    weights = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.visual.patch_embed.proj.weight", "model.visual.pos_embed.weight",
                 "model.visual.blocks.1.attn.qkv.weight", "model.visual.blocks.0.mlp.linear_fc2.bias",
                 "model.visual.merger.norm.weight", "model.visual.merger.linear_fc2.weight",
                 "model.time_series.encoder_embed.conv.weight", "model.time_series.encoder.layers.1.fc1.weight",
                 "model.time_series.encoder.embed_positions.weight", "model.time_series.projector.linear_2.weight"):
        assert name in weights, name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_config"]["depth"] == cfg.model.vision.layers
    assert config["vision_config"]["num_position_embeddings"] == cfg.model.vision.grid ** 2
    assert config["ts_config"]["d_model"] == cfg.model.timeseries.hidden
    assert config["image_token_id"] == cfg.model.image_token_id and config["ts_token_id"] == cfg.model.ts_token_id
    back = _state(cli.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported")))
    assert back.keys() == state.keys()
    assert all(torch.equal(state[k], back[k]) for k in state)


def test_a_selection_bias_the_released_code_would_ignore_is_refused(tmp_path):
    path, _ = _trained(tmp_path, steps=1, bias_update_rate=1e-2)  # one step: loads are uneven, so the bias moved
    assert any(t.any() for n, t in _state(path).items() if n.endswith("selection_bias"))
    with pytest.raises(ValueError, match=r"model\.moe\.bias_update_rate.*routes without it"):
        cli.export(path, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf_layout.tmp").exists()  # a failed export leaves nothing


def test_transformers_5_files_import_fused_experts_and_num_local_experts(tmp_path):
    path, cfg = _trained(tmp_path, pos_emb="rope", n_groups=1)
    cli.export(path, str(tmp_path / "hf"), layout="qwen3_moe")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_local_experts"] = config.pop("num_experts")  # how transformers 5 writes it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    files = sorted(p for p in os.listdir(tmp_path / "hf") if p.endswith(".safetensors"))
    weights = {k: v for f in files for k, v in load_file(str(tmp_path / "hf" / f)).items()}
    for layer in range(cfg.model.layers):  # experts saved fused, gate rows first (transformers 5)
        base = f"model.layers.{layer}.mlp.experts."
        gate = [weights.pop(f"{base}{e}.gate_proj.weight") for e in range(16)]
        up = [weights.pop(f"{base}{e}.up_proj.weight") for e in range(16)]
        down = [weights.pop(f"{base}{e}.down_proj.weight") for e in range(16)]
        weights[base + "gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        weights[base + "down_proj"] = torch.stack(down)
    for f in files:
        os.remove(tmp_path / "hf" / f)
    os.remove(tmp_path / "hf" / "model.safetensors.index.json")
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    original, back = _state(path), _state(cli.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported")))
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("change, key", [
    ({"hidden_act": "gelu"}, "hidden_act"), ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"), ({"attention_bias": True}, "attention_bias"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ({"rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20]}}, "rope_scaling.mrope_section")])
def test_what_scimoe_cannot_compute_is_refused_naming_the_field(change, key):
    config = hf_layout.hf_config(tiny_config().model, "intern_s1_pro")
    config["text_config"].update(change)
    with pytest.raises(ValueError, match=f"config error at '(text_config\\.)?{key.replace('.', chr(92) + '.')}'"):
        hf_layout.model_config(config)


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
    with pytest.raises(ValueError, match="text-only with RoPE and one router group"):
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
    start = storage.step_dir(str(tmp_path / "imported"), 0)
    with pytest.raises(ValueError, match="weights only"):
        contents.load(start, build_model(cfg.model), None)
    fresh = tiny_config(steps=2)
    fresh.checkpoint.init_weights = start  # no data.tokenizer: the weights' tokenizer came with them
    from_import = pretrain(fresh, str(tmp_path / "finetune")).records
    # A folder without any tokenizer: the import says to name one, and a run from it refuses to guess.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(tmp_path / "hf" / name)
    out = subprocess.run([sys.executable, "-c", "from scimoe.convert.cli import import_main; import_main()",
                          str(tmp_path / "hf"), str(tmp_path / "bare")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "data.tokenizer=TOKENIZER" in out.stdout, out.stdout + out.stderr
    bare = tiny_config(steps=2)
    bare.checkpoint.init_weights = storage.step_dir(str(tmp_path / "bare"), 0)
    with pytest.raises(ValueError, match="data.tokenizer"):  # the weights' tokenizer must come with them
        pretrain(bare, str(tmp_path / "no_tokenizer"))
    fresh.data.tokenizer = str(tmp_path / "run" / "tokenizer.json")
    # The same as starting from the trained weights in memory, and not like a fresh start.
    same_data = tiny_config(steps=2)
    same_data.data.tokenizer = fresh.data.tokenizer
    direct = pretrain(same_data, str(tmp_path / "direct"), initial_state=_state(path)).records
    scratch = pretrain(tiny_config(steps=2), str(tmp_path / "scratch")).records
    assert [r["loss"] for r in from_import] == [r["loss"] for r in direct]
    assert from_import[0]["loss"] != scratch[0]["loss"]


def test_bad_folders_are_refused_by_name_and_leave_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="config.json is missing"):
        cli.import_hf(str(tmp_path), str(tmp_path / "out"))
    path, _ = _trained(tmp_path)
    cli.export(path, str(tmp_path / "good"), max_shard_bytes=400_000)

    def broken(name: str):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        return folder, sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))

    folder, files = broken("missing_expert")
    weights = load_file(str(folder / files[1]))
    gone = next(k for k in weights if ".experts.3." in k)
    weights.pop(gone)
    save_file(weights, str(folder / files[1]))
    cases = {"missing_expert": f"places '{gone}' in {files[1]}, which lacks it"}
    folder, files = broken("truncated")
    (folder / files[0]).write_bytes((folder / files[0]).read_bytes()[:100])
    cases["truncated"] = f"{files[0]} is not a readable safetensors file"
    folder, files = broken("missing_shard")
    os.remove(folder / files[-1])
    cases["missing_shard"] = f"names {files[-1]}, which is not in"
    folder, files = broken("wrong_shape")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    cases["wrong_shape"] = "has shape .* config.json implies"
    folder, files = broken("foreign_weight")
    weights = load_file(str(folder / files[0]))
    weights["model.visual.deepstack_merger_list.0.norm.weight"] = torch.ones(4)
    save_file(weights, str(folder / files[0]))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.visual.deepstack_merger_list.0.norm.weight"] = files[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["foreign_weight"] = "holds 'model.visual.deepstack_merger_list.0.norm.weight'.*no place for"
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            cli.import_hf(str(tmp_path / name), str(tmp_path / f"out_{name}"))
        assert not (tmp_path / f"out_{name}").exists(), name  # nothing partial left
    assert hf_layout.LAYOUTS == ("intern_s1_pro", "qwen3_moe")


def test_the_tokenizer_travels_with_the_weights_through_export_and_import(tmp_path):
    """Every checkpoint holds the run's tokenizer; an export is a folder AutoTokenizer reads with the training ids
    (before, it returned a 1-token tokenizer) and whose files anyone may read; an import keeps the tokenizer, so a run
    started from it needs no data.tokenizer."""
    import stat

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path, cfg = _trained(tmp_path)
    trained = (tmp_path / "run" / "tokenizer.json").read_bytes()
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "tokenizer.json").read_bytes() == trained
    cli.export(path, str(tmp_path / "hf"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    ours = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
    text = "The quick brown fox <|im_start|>user\nhi<|im_end|><|endoftext|>"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text).ids
    assert len(theirs) == ours.get_vocab_size() > 300 and theirs.eos_token == "<|endoftext|>"
    assert all(stat.S_IMODE(os.stat(tmp_path / "hf" / name).st_mode) == 0o644 for name in os.listdir(tmp_path / "hf"))
    imported = cli.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    assert (tmp_path / "imported" / "checkpoints" / "step_00000000" / "tokenizer.json").read_bytes() == trained
    start = tiny_config(steps=1)
    start.checkpoint.init_weights = imported  # and no data.tokenizer
    record = pretrain(start, str(tmp_path / "continued")).records[0]
    assert (tmp_path / "continued" / "checkpoints" / "step_00000001" / "tokenizer.json").read_bytes() == trained
    assert record["lm_loss"] < 5.5  # the trained weights read the same ids (a fresh model starts near ln 384 = 5.95)
