"""`scimoe-export` and `scimoe-import`: scimoe checkpoints ↔ Hugging Face folders.

Run: `scimoe-export RUN/checkpoints/step_00000050 OUT [--layout intern_s1_pro|qwen3_moe]` gathers the
tp/pp/ep slices of any layout's checkpoint into `safetensors` shards + `config.json` (no process group
needed: the checkpoint's pieces say where they belong). `scimoe-import HF_DIR OUT` writes a weights-only
scimoe checkpoint that any layout starts from with `checkpoint.init_weights=PATH`.
Tested by `python -m pytest tests/train/test_hf_export.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from scimoe.config import Config, ModelConfig, validate
from scimoe.convert import hf
from scimoe.model.transformer import MoETransformer
from scimoe.train import checkpoint, shards


def _layer_order(name: str) -> tuple:
    """Embedding and FoPE first, then layer by layer, then the final norm and LM head."""
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return (2 if parts[0] in ("norm", "lm_head") else 0, 0, name)


def checkpoint_model_config(path: str) -> ModelConfig:
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(os.path.join(path, "config.yaml")))
    return validate(saved).model


def export(path: str, out: str, layout: str = "intern_s1_pro", max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write checkpoint `path` (any layout) as a HF folder `out`; returns the shard file names."""
    path = checkpoint.find_resume_path("", path, "scimoe-export CHECKPOINT")
    cfg = checkpoint_model_config(path)
    hf.check_exportable(cfg, layout)
    index = shards.ShardIndex(checkpoint.files(path, "model"))
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(index.names(), key=_layer_order):
        for hf_name, t in hf.to_hf(name, index.full(name), layout):
            nbytes = t.numel() * t.element_size()
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append({})
                size = 0
            groups[-1][hf_name] = t.contiguous().clone()
            size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for file, group in zip(names, groups):
        save_file(group, os.path.join(tmp, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for g in groups for t in g.values())
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf.hf_config(cfg, layout), f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return names


def read_hf(folder: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and every weight of a HF folder (sharded with an index, or not)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: not a Hugging Face model folder")
    with open(config_path) as f:
        cfg = hf.model_config(json.load(f))
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    weights = {}
    for file in files:
        with safe_open(os.path.join(folder, file), framework="pt") as handle:
            weights.update({k: handle.get_tensor(k) for k in handle.keys()})
    return cfg, weights


def import_hf(folder: str, run_dir: str) -> str:
    """Write HF folder `folder` as a weights-only scimoe checkpoint (step 0) under `run_dir`; returns it."""
    cfg, weights = read_hf(folder)
    state = hf.from_hf(weights, cfg)
    with torch.device("meta"):
        expected = {k: v for k, v in MoETransformer(cfg).state_dict().items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder} does not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{folder}: '{name}' has shape {list(t.shape)}, config.json implies {list(expected[name].shape)}")
    entries = {name: (name, t.to(expected[name].dtype), shards.placement(t, None)) for name, t in state.items()}
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(Config(model=cfg)))
    return checkpoint.write(run_dir, 0, entries, None, None, config_yaml)


def model_overrides(cfg: ModelConfig) -> list[str]:
    """`model.*=value` command-line overrides that reproduce `cfg`."""
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = []
    for key, value in flat.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            out.append(f"model.{key}{'.' + sub if sub else ''}={json.dumps(v) if isinstance(v, str) else v}")
    return out


def export_main() -> None:
    parser = argparse.ArgumentParser(prog="scimoe-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a complete checkpoint folder, e.g. RUN/checkpoints/step_00000050")
    parser.add_argument("out", help="output folder (replaced)")
    parser.add_argument("--layout", choices=hf.LAYOUTS, default="intern_s1_pro")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args()
    try:
        names = export(args.checkpoint, args.out, args.layout, int(args.max_shard_gb * 2**30))
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"scimoe-export: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(names)} shard(s) and config.json to {args.out}")


def import_main() -> None:
    parser = argparse.ArgumentParser(prog="scimoe-import", description=__doc__.splitlines()[0])
    parser.add_argument("hf_folder", help="a Hugging Face folder: config.json + *.safetensors")
    parser.add_argument("run_dir", help="where to write RUN_DIR/checkpoints/step_00000000")
    args = parser.parse_args()
    try:
        path = import_hf(args.hf_folder, args.run_dir)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"scimoe-import: {err}", file=sys.stderr)
        sys.exit(2)
    cfg = checkpoint_model_config(path)
    print(f"wrote {path}\nstart training from it with:\n  scimoe-train checkpoint.init_weights={path} "
          + " ".join(model_overrides(cfg)))
