"""A Hugging Face folder read lazily, slice by slice, in scimoe's names: what `checkpoint.init_weights=hf:PATH`
and `scimoe-import` load from.

Tested by `python -m pytest tests/train/test_hf_export.py tests/distributed/test_hf_load.py`. `HFIndex` offers the
same `read(name, placement, shape)` as a scimoe checkpoint's ShardIndex (scimoe/checkpoint/shards.py), so every rank
of any layout reads only the slices it owns, through safetensors' `get_slice` (bf16 on disk, nothing else
loaded): a rank's peak host memory is its own share plus one tensor's slice. Experts stored one per name are
assembled into scimoe's fused [E, 2F, H] / [E, H, F] slices expert by expert. The folder is checked before
anything is read: config.json, the index and every file it names (present, a readable safetensors header), every
weight the model needs (present, shaped as the config implies); each failure names the file or tensor.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from scimoe.config import ConfigError, ModelConfig
from scimoe.checkpoint import hf_layout
from scimoe.checkpoint.shards import Placement

_TRAINING_ONLY = ("mlp.router.selection_bias", "mlp.expert_output_ema")
_COMPUTED = ("encoder_embed.pos_encoder.pe",)
_IGNORED = ("rotary_emb.inv_freq",)
"""Names a folder may hold that scimoe recomputes anyway."""
"""Fixed tables a folder may leave out: computed from their shape (the time-series tower's sinusoids)."""


class HFFolderError(ValueError):
    """A Hugging Face folder that cannot be loaded (the message names the file or tensor)."""


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise HFFolderError(f"{path}: not a usable config (a JSON {type(config).__name__}, not an object)")
        return hf_layout.model_config(config)
    except FileNotFoundError as err:
        raise HFFolderError(f"{path} is missing: not a Hugging Face model folder") from err
    except (ValueError, KeyError) as err:
        if isinstance(err, (ConfigError, HFFolderError)):
            raise
        raise HFFolderError(f"{path}: not a usable config ({type(err).__name__}: {err})") from err


def weight_files(folder: str) -> dict[str, str]:
    """{HF tensor name: file} from model.safetensors.index.json (each file checked to hold what the index says),
    or from the folder's .safetensors files."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as err:
            raise HFFolderError(f"{index}: not a safetensors index ({err})") from err
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, file)):
                raise HFFolderError(f"{index} names {file}, which is not in {folder}")
            with _open(os.path.join(folder, file)) as handle:
                held = set(handle.keys())
            missing = sorted(name for name, f in weight_map.items() if f == file and name not in held)
            if missing:
                raise HFFolderError(f"{index} places '{missing[0]}' in {file}, which lacks it"
                                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        return weight_map
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise HFFolderError(f"no .safetensors files in {folder}")
    out = {}
    for file in files:
        with _open(os.path.join(folder, file)) as handle:
            out.update(dict.fromkeys(handle.keys(), file))
    return out


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # noqa: BLE001 (safetensors raises several types for a broken header)
        raise HFFolderError(f"{path} is not a readable safetensors file ({err})") from err


class HFIndex:
    """The weights of `folder` for a model of `cfg`, in scimoe's names (see the module docstring)."""

    def __init__(self, folder: str, cfg: ModelConfig) -> None:
        from scimoe.model import build_model

        self.folder = folder
        self.files = weight_files(folder)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
        self.global_shapes = expected
        self.prefix = next((p for p in ("model.language_model.", "model.") if f"{p}embed_tokens.weight" in self.files),
                           None)
        if self.prefix is None:
            raise HFFolderError(f"{folder} has no embed_tokens.weight under model.language_model. or model.")
        self.sources: dict[str, str] = {}  # scimoe name → HF name (plain tensors, fused experts)
        self.experts: set[str] = set()  # scimoe expert names assembled from per-expert tensors
        unknown = []
        for hf_name in self.files:
            name = hf_layout.from_hf_name(hf_name, self.prefix)
            if name is None:
                if not hf_name.endswith(_IGNORED):
                    unknown.append(hf_name)
                continue
            if m := hf_layout.EXPERT.match(name):
                fused = f"layers.{m.group(1)}.mlp.experts." + ("down_proj" if m.group(3) == "down_proj" else "gate_up_proj")
                self.experts.add(fused)
            elif name in expected:
                self.sources[name] = hf_name
            else:
                unknown.append(hf_name)
        if unknown:  # a weight scimoe would silently drop computes something scimoe does not
            raise HFFolderError(f"{folder} holds '{unknown[0]}'{f' and {len(unknown) - 1} more weights' if len(unknown) > 1 else ''}"
                                " that scimoe's model has no place for (another architecture, e.g. Qwen3-VL's "
                                "deepstack mergers)")
        self._check(cfg)

    def _check(self, cfg: ModelConfig) -> None:
        for name, shape in self.global_shapes.items():
            if name.endswith(_TRAINING_ONLY) or (name.endswith(_COMPUTED) and name not in self.sources):
                continue
            if name in self.experts:
                self._check_experts(name, shape)
            elif name not in self.sources:
                raise HFFolderError(f"{self.folder} lacks the weight for '{name}' (config.json implies it)")
            else:
                got = self._shape(self.sources[name])
                if got != shape and not (name.startswith("rotary.") and (1, *got) == shape):
                    raise HFFolderError(f"{self.folder}: '{self.sources[name]}' has shape {list(got)}, config.json "
                                        f"implies {list(shape)}")

    def _check_experts(self, name: str, shape: tuple[int, ...]) -> None:
        layer = name.split(".")[1]
        experts, rows, cols = shape
        kinds = ("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")
        want = (rows, cols) if name.endswith("down_proj") else (rows // 2, cols)
        for e in range(experts):
            for kind in kinds:
                hf_name = f"{self.prefix}layers.{layer}.mlp.experts.{e}.{kind}.weight"
                if hf_name not in self.files:
                    raise HFFolderError(f"{self.folder} lacks '{hf_name}' ({experts} experts in config.json)")
                got = self._shape(hf_name)
                if got != want:
                    raise HFFolderError(f"{self.folder}: '{hf_name}' has shape {list(got)}, config.json implies "
                                        f"{list(want)}")

    def _shape(self, hf_name: str) -> tuple[int, ...]:
        if not hasattr(self, "_shapes"):  # every file's header once
            self._shapes = {}
            for file in sorted(set(self.files.values())):
                with _open(os.path.join(self.folder, file)) as handle:
                    self._shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        return self._shapes[hf_name]

    def _slice(self, hf_name: str, window: tuple[slice, ...]) -> torch.Tensor:
        """A copy of `window` of one tensor; the file is mapped only while it is read, so its pages do not
        stay in this process's memory."""
        with _open(os.path.join(self.folder, self.files[hf_name])) as handle:
            return handle.get_slice(hf_name)[window] if window else handle.get_tensor(hf_name)

    def __contains__(self, name: str) -> bool:
        return name in self.global_shapes

    def names(self) -> list[str]:
        return sorted(self.global_shapes)

    def full(self, name: str) -> torch.Tensor:
        shape = self.global_shapes[name]
        return self.read(name, Placement(shape, (0,) * len(shape)), shape)

    def read(self, name: str, where: Placement, shape: tuple[int, ...]) -> torch.Tensor:
        """The slice of `name` at `where.offsets` of size `shape`, read from the files."""
        window = tuple(slice(o, o + n) for o, n in zip(where.offsets, shape))
        if name.endswith(_TRAINING_ONLY):  # not in released folders: starts at its initial value
            return torch.zeros(shape)
        if name in self.experts:
            return self._read_experts(name, window)
        if name.endswith(_COMPUTED) and name not in self.sources:
            from scimoe.model.timeseries import _sinusoids

            full = self.global_shapes[name]
            return _sinusoids(full[0], full[2])[window]
        hf_name = self.sources[name]
        if name.startswith("rotary.") and len(self._shape(hf_name)) == len(shape) - 1:  # one shared table, 2-D
            return self._slice(hf_name, window[1:]).unsqueeze(0)
        return self._slice(hf_name, window)

    def _read_experts(self, name: str, window: tuple[slice, ...]) -> torch.Tensor:
        layer = name.split(".")[1]
        base = f"{self.prefix}layers.{layer}.mlp.experts."
        experts, rows, cols = window
        out = []
        for e in range(experts.start, experts.stop):
            if name.endswith("down_proj"):
                out.append(self._slice(f"{base}{e}.down_proj.weight", (rows, cols)))
                continue
            f = self.global_shapes[name][1] // 2  # gate rows [0, F), up rows [F, 2F)
            pieces = []
            if rows.start < f:
                pieces.append(self._slice(f"{base}{e}.gate_proj.weight", (slice(rows.start, min(rows.stop, f)), cols)))
            if rows.stop > f:
                pieces.append(self._slice(f"{base}{e}.up_proj.weight", (slice(max(rows.start, f) - f, rows.stop - f), cols)))
            out.append(torch.cat(pieces))
        return torch.stack(out)
