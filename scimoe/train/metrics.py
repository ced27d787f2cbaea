"""Per-step metrics: MoE health summaries and the loggers (jsonl, wandb, none).

Tested by `python -m pytest tests/train/test_metrics.py`. `make_logger` returns an object with
`log(dict)` and `close()` whatever the backend, so the loop has no logger branches.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from scimoe.config import LoggerConfig


def moe_health(counts: list[torch.Tensor], entropy: list[float]) -> dict[str, list[float]]:
    """Per MoE layer: max/mean expert load, router entropy, and share of experts that got no token."""
    out: dict[str, list[float]] = {"max_over_mean_load": [], "router_entropy": [], "dead_expert_share": []}
    for c, h in zip(counts, entropy):
        mean = float(c.float().mean())
        out["max_over_mean_load"].append(float(c.max()) / mean if mean > 0 else 0.0)
        out["router_entropy"].append(float(h))
        out["dead_expert_share"].append(float((c == 0).float().mean()))
    return out


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            for name, per_layer in value.items():
                for i, v in enumerate(per_layer):
                    flat[f"{key}/{name}/layer_{i}"] = v
        else:
            flat[key] = value
    return flat


class NullLogger:
    """Logs nothing (logger=none, and every rank but the logging one)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per optimizer step in `run_dir/metrics.jsonl`.

    On resume from step k, lines after step k (written by the interrupted run after its last
    checkpoint) are dropped, so the file holds each step exactly once.
    """

    def __init__(self, run_dir: str, resume_step: int = 0) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbLogger(JsonlLogger):
    """metrics.jsonl plus wandb (offline by default: no network; sync later with `wandb sync`)."""

    def __init__(self, run_dir: str, cfg: LoggerConfig, config: dict, resume_step: int = 0) -> None:
        super().__init__(run_dir, resume_step)
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=cfg.project, mode=cfg.mode, dir=run_dir, config=config,
                               name=os.path.basename(os.path.normpath(run_dir)))

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        self._run.log(_flatten(record), step=record["step"])

    def close(self) -> None:
        super().close()
        self._run.finish()


def make_logger(cfg: LoggerConfig, run_dir: str, is_logging_rank: bool, config: dict, resume_step: int = 0):
    if not is_logging_rank or cfg.kind == "none":
        return NullLogger()
    if cfg.kind == "wandb":
        return WandbLogger(run_dir, cfg, config, resume_step)
    return JsonlLogger(run_dir, resume_step)
