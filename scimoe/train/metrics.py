"""Per-step metrics: MoE health per layer, the load heatmap, and the loggers (jsonl, wandb, none).

Tested by `python -m pytest tests/train/test_report.py tests/train/test_pretrain.py`. `make_logger` returns an object with
`log(dict)` and `close()` whatever the backend, so the loop has no logger branches.
"""
from __future__ import annotations

import json
import secrets
import logging
import os
from typing import Any

import torch

from scimoe.config import LoggerConfig
from scimoe.model.moe.layer import LAYER_STATS

log = logging.getLogger("scimoe")


def moe_health(counts: list[torch.Tensor], stats: list[torch.Tensor]) -> dict[str, list]:
    """Per MoE layer (lists indexed by MoE layer): tokens per expert, max/mean load, dead experts (count and
    share), and the layer's router entropy, balance loss, z-loss and aux-free bias drift."""
    out: dict[str, list] = {"tokens_per_expert": [], "max_over_mean_load": [], "dead_experts": [],
                            "dead_expert_share": [], **{name: [] for name in LAYER_STATS}}
    for c, layer in zip(counts, stats):
        mean = float(c.float().mean())
        out["tokens_per_expert"].append([int(v) for v in c.tolist()])
        out["max_over_mean_load"].append(float(c.max()) / mean if mean > 0 else 0.0)
        out["dead_experts"].append(int((c == 0).sum()))
        out["dead_expert_share"].append(float((c == 0).float().mean()))
        for name, value in zip(LAYER_STATS, layer.tolist()):
            out[name].append(value)
    return out


def expert_load_figure(loads: list[list[int]], step: int):
    """A layer × expert heatmap of each expert's share of its layer's routed tokens (matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    share = np.asarray(loads, dtype=float)
    share = share / np.maximum(share.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, share.shape[1] / 8), max(2.5, share.shape[0] / 4)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load share, step {step}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    """wandb keys: `moe/router_entropy/layer_3`, `tokens_by_modality/text`; per-expert lists stay out
    (they go to the heatmap image)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            for name, inner in value.items():
                if isinstance(inner, list):
                    flat.update({f"{key}/{name}/layer_{i}": v for i, v in enumerate(inner) if not isinstance(v, list)})
                else:
                    flat[f"{key}/{name}"] = inner
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
    checkpoint) are dropped, so the file holds each step exactly once. A line cut short (a kill or a full
    disk in the middle of a write) is dropped with a warning naming it, never an error: the metrics file can
    never stop a run from resuming. A failed write (disk full) is reported, cut back, and training goes on.
    """

    def __init__(self, run_dir: str, resume_step: int = 0) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    step = _step_of(raw)
                    if step is None:
                        if raw.strip():
                            log.warning("%s:%d: dropped a cut or unreadable metrics line (%d bytes)", self.path,
                                        number, len(raw))
                        continue
                    if step <= resume_step:
                        kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
        with open(self.path + ".tmp", "wb") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing pending
        self._warned = False

    def log(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        start = self._file.tell()
        try:
            written = 0
            while written < len(line):
                written += self._file.write(line[written:])
        except OSError as err:
            if not self._warned:
                log.warning("%s: metrics of step %s not written (%s); training goes on", self.path,
                            record.get("step"), err)
                self._warned = True
            try:  # never leave half a line for the next one to continue
                self._file.truncate(start)
                self._file.seek(start)
            except OSError as cut:
                log.warning("%s: could not remove the half-written line of step %s (%s); a resume drops it",
                            self.path, record.get("step"), cut)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:
            log.warning("%s: closing the metrics file failed: %s", self.path, err)


def _step_of(raw: bytes) -> int | None:
    """The `step` of one metrics.jsonl line, or None when the line is not a whole JSON record."""
    try:
        step = json.loads(raw)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


WANDB_RUN_ID = "wandb_run_id"
"""File in the run folder holding the wandb run id, so a resumed run logs into the same wandb run."""


class WandbLogger(JsonlLogger):
    """metrics.jsonl plus wandb (offline by default: no network; sync later with `wandb sync`). A run that
    resumes from a checkpoint continues the wandb run whose id the run folder keeps, rewound to the checkpoint's
    step (wandb's `resume_from`)."""

    def __init__(self, run_dir: str, cfg: LoggerConfig, config: dict, resume_step: int = 0) -> None:
        super().__init__(run_dir, resume_step)
        import wandb

        self._wandb = wandb
        self._heatmap_every = cfg.heatmap_every
        id_file = os.path.join(run_dir, WANDB_RUN_ID)
        run_id = None
        if resume_step > 0 and os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip() or None
        # A resumed run rewinds the wandb run to its checkpoint's step: an interrupted run may have logged steps
        # after it, and wandb rejects steps at or below the last one it has (they are logged again now).
        where = {"resume_from": f"{run_id}?_step={resume_step}"} if run_id else {"id": secrets.token_hex(4)}
        with open(id_file, "w") as f:
            f.write((run_id or where["id"]) + "\n")
        self._run = wandb.init(project=cfg.project, mode=cfg.mode, dir=run_dir, config=config,
                               name=os.path.basename(os.path.normpath(run_dir)), **where)

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        values = _flatten(record)
        loads = record.get("moe", {}).get("tokens_per_expert")
        if loads and self._heatmap_every and record["step"] % self._heatmap_every == 0:
            import matplotlib.pyplot as plt

            fig = expert_load_figure(loads, record["step"])
            values["moe/expert_load"] = self._wandb.Image(fig)
            plt.close(fig)
        self._run.log(values, step=record["step"])

    def close(self) -> None:
        super().close()
        self._run.finish()


def make_logger(cfg: LoggerConfig, run_dir: str, is_logging_rank: bool, config: dict, resume_step: int = 0):
    if not is_logging_rank or cfg.kind == "none":
        return NullLogger()
    if cfg.kind == "wandb":
        return WandbLogger(run_dir, cfg, config, resume_step)
    return JsonlLogger(run_dir, resume_step)
