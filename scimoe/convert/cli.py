"""`scimoe-export` and `scimoe-import`: scimoe checkpoints ↔ Hugging Face folders.

Run: `scimoe-export RUN/checkpoints/step_00000050 OUT [--layout intern_s1_pro|qwen3_moe]` (or RUN for its newest
usable checkpoint) gathers the slices of any layout's checkpoint into `safetensors` shards + `config.json` (no process group needed: the checkpoint's
pieces say where they belong); under `torchrun --nproc_per_node=N -m scimoe.convert.cli export …` every rank
writes its share of the shards and rank 0 the index. `scimoe-import HF_DIR OUT` writes a weights-only scimoe
checkpoint that any layout starts from with `checkpoint.init_weights=PATH`; a large folder needs no import:
`checkpoint.init_weights=hf:HF_DIR` reads it rank by rank. A failed export or import leaves nothing behind.
Tested by `python -m pytest tests/train/test_hf_export.py tests/distributed/test_hf_load.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from scimoe.config import Config, ConfigError, ModelConfig, validate
from scimoe.checkpoint import contents, hf_layout, shards, storage
from scimoe.checkpoint.hf_index import HFFolderError, HFIndex, read_config
from scimoe.data.tokenizer import HF_TOKENIZER_FILES, stored_tokenizer, tokenizer_files

ERRORS = (ValueError, KeyError, FileNotFoundError, storage.CheckpointError, HFFolderError)


def _layer_order(name: str) -> tuple:
    """Embedding and FoPE first, then layer by layer, then the final norm, LM head and the encoders."""
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return (2 if parts[0] in ("norm", "lm_head") else 3 if parts[0] in ("vision", "timeseries") else 0, 0, name)


def checkpoint_model_config(path: str) -> ModelConfig:
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(os.path.join(path, "config.yaml")))
    return validate(saved).model


def _shard_plan(index: shards.ShardIndex, layout: str, max_shard_bytes: int) -> list[list[str]]:
    """scimoe names grouped into the output files (≤ max_shard_bytes each), from the checkpoint's metadata alone,
    so every rank computes the same plan."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(index.names(), key=_layer_order):
        shape = index.global_shapes[name]
        nbytes = index.element_size(name) * int(torch.tensor(shape).prod()) if shape else index.element_size(name)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def export(path: str, out: str, layout: str = "intern_s1_pro", max_shard_bytes: int = 5 * 2**30, rank: int = 0,
           world: int = 1, barrier=lambda: None) -> list[str]:
    """Write checkpoint `path` (any layout) as a HF folder `out`; rank r of `world` writes files r, r + world, …
    Returns the shard file names."""
    if os.path.exists(os.path.join(path, storage.MARKER)):
        path = storage.find_resume_path("", path, "scimoe-export CHECKPOINT")  # refused when unusable
    elif os.path.isdir(os.path.join(path, "checkpoints")):  # a run folder: its newest usable checkpoint
        run, path = path, storage.find_resume_path(path, "auto", "scimoe-export RUN")
        if path is None:
            raise ValueError(f"{run} has no complete checkpoint to export")
    else:
        raise ValueError(f"{path} is not a scimoe checkpoint: expected a folder such as RUN/checkpoints/step_00000050 "
                         f"holding a {storage.MARKER} marker, or a run folder RUN")
    cfg = checkpoint_model_config(path)
    hf_layout.check_exportable(cfg, layout)
    index = shards.ShardIndex(contents.files(path, "model"))
    tmp = out.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    plan = _shard_plan(index, layout, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    try:
        weight_map, total = {}, 0
        for i, (file, group) in enumerate(zip(names, plan)):
            tensors = {hf_name: t.contiguous().clone() for name in group for hf_name, t in hf_layout.to_hf(name, index.full(name), layout)}
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            if i % world == rank:
                save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        barrier()
        if rank == 0:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_layout.hf_config(cfg, layout), f, indent=1)
            for name in HF_TOKENIZER_FILES:  # the tokenizer the weights were trained with travels with them
                if os.path.isfile(os.path.join(path, name)):
                    shutil.copyfile(os.path.join(path, name), os.path.join(tmp, name))
            for name in os.listdir(tmp):  # an ordinary folder of readable files, whatever the writers' modes
                os.chmod(os.path.join(tmp, name), 0o644)
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def import_hf(folder: str, run_dir: str) -> str:
    """Write HF folder `folder` as a weights-only scimoe checkpoint (step 0) under `run_dir`; returns it. Nothing
    is left behind when the folder cannot be read."""
    cfg = read_config(folder)
    index = HFIndex(folder, cfg)
    with torch.device("meta"):
        dtypes = {k: v.dtype for k, v in _meta_state(cfg).items()}
    entries = {name: (name, index.full(name).to(dtypes[name]), None) for name in index.names()}
    entries = {k: (n, t, shards.placement(t, None)) for k, (n, t, _) in entries.items()}
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(Config(model=cfg)))
    root = storage.checkpoint_root(run_dir)
    existed = os.path.isdir(run_dir)
    try:
        return contents.write(run_dir, 0, entries, None, None, config_yaml,
                              extra_files=tokenizer_files(f"hf:{folder}"))  # whichever tokenizer files it has
    except BaseException:
        shutil.rmtree(root if existed else run_dir, ignore_errors=True)
        raise


def _meta_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from scimoe.model import build_model

    return {k: v for k, v in build_model(cfg).state_dict().items() if isinstance(v, torch.Tensor)}


def model_overrides(cfg: ModelConfig) -> list[str]:
    """`model.*=value` command-line overrides that reproduce `cfg`."""
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = []
    for key, value in flat.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            out.append(f"model.{key}{'.' + sub if sub else ''}={json.dumps(v) if isinstance(v, str) else v}")
    return out


def _distributed() -> tuple[int, int, object]:
    """(rank, world, barrier) under torchrun; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return dist.get_rank(), world, dist.barrier


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scimoe-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a complete checkpoint folder, e.g. RUN/checkpoints/step_00000050, or a "
                        "run folder RUN (its newest usable checkpoint)")
    parser.add_argument("out", help="output folder (replaced)")
    parser.add_argument("--layout", choices=hf_layout.LAYOUTS, default="intern_s1_pro")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    rank, world, barrier = _distributed()
    began = time.perf_counter()
    try:
        names = export(args.checkpoint, args.out, args.layout, int(args.max_shard_gb * 2**30), rank, world, barrier)
    except ERRORS as err:
        print(f"scimoe-export: {err}", file=sys.stderr)
        sys.exit(2)
    if rank == 0:
        print(f"wrote {len(names)} shard(s) and config.json to {args.out} ({world} rank(s), "
              f"{time.perf_counter() - began:.1f} s)")


def import_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scimoe-import", description=__doc__.splitlines()[0])
    parser.add_argument("hf_folder", help="a Hugging Face folder: config.json + *.safetensors")
    parser.add_argument("run_dir", help="where to write RUN_DIR/checkpoints/step_00000000")
    args = parser.parse_args(argv)
    try:
        path = import_hf(args.hf_folder, args.run_dir)
    except ERRORS as err:
        print(f"scimoe-import: {err}", file=sys.stderr)
        sys.exit(2)
    cfg = checkpoint_model_config(path)
    tokenizer = "" if stored_tokenizer(path) else " data.tokenizer=TOKENIZER  # the folder has no tokenizer: name one"
    print(f"wrote {path}\nstart training from it with:\n  scimoe-train checkpoint.init_weights={path} "
          + " ".join(model_overrides(cfg)) + tokenizer)


if __name__ == "__main__":
    COMMANDS = {"export": export_main, "import": import_main}
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: python -m scimoe.convert.cli {export,import} ... (the same arguments as scimoe-export and "
              "scimoe-import)", file=sys.stderr)
        sys.exit(2)
    COMMANDS[sys.argv[1]](sys.argv[2:])
