"""`scimoe-report RUN_DIR [--out FOLDER]`: PNG plots from a run's `metrics.jsonl`.

Writes `loss.png` (loss terms, grad norm, lr, tokens/s and MFU over steps), `expert_load.png` (per MoE
layer, each expert's share of the routed tokens over time), `expert_load_last.png` (layer × expert at
the last step, the image wandb also gets every `logger.heatmap_every` steps) and `moe_health.png` (max/mean
load, router entropy, dead experts and bias drift per layer). Tested by `tests/train/test_report.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scimoe.train.metrics import expert_load_figure  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: not a scimoe run folder")
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                bad += 1  # a line cut short by a killed job
    if bad:
        print(f"scimoe-report: skipped {bad} unreadable line(s) of {path}", file=sys.stderr)
    if not records:
        raise ValueError(f"{path} has no metrics")
    return records


def _save(fig, out: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curves(records: list[dict], out: str) -> str:
    steps = [r["step"] for r in records]
    panels = [("loss", ["loss", "lm_loss"]), ("balance and z", ["balance_loss", "z_loss"]), ("grad norm", ["grad_norm"]),
              ("learning rate", ["lr"]), ("tokens/s", ["tokens_per_s"]), ("MFU", ["mfu"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(steps, [r.get(key, np.nan) for r in records], label=key)
        ax.set(title=title, xlabel="step")
        if len(keys) > 1:
            ax.legend()
    skipped = [r["step"] for r in records if r.get("skipped")]
    for step in skipped:
        axes.flat[0].axvline(step, color="red", alpha=0.3)
    return _save(fig, out, "loss.png")


def _load_over_time(records: list[dict], out: str) -> str:
    loads = np.asarray([r["moe"]["tokens_per_expert"] for r in records], dtype=float)  # [steps, layers, experts]
    share = loads / np.maximum(loads.sum(axis=2, keepdims=True), 1)
    layers = share.shape[1]
    cols = min(layers, 4)
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    steps = [r["step"] for r in records]
    for i, ax in enumerate(axes.flat):
        if i >= layers:
            ax.axis("off")
            continue
        im = ax.imshow(share[:, i, :].T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share.shape[2] - 0.5))
        ax.set(title=f"MoE layer {i}", xlabel="step", ylabel="expert")
        fig.colorbar(im, ax=ax)
    fig.suptitle("expert load share over time")
    return _save(fig, out, "expert_load.png")


def _health(records: list[dict], out: str) -> str:
    steps = [r["step"] for r in records]
    keys = ["max_over_mean_load", "router_entropy", "dead_experts", "bias_abs_max"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        values = np.asarray([r["moe"][key] for r in records], dtype=float)
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], label=f"layer {layer}")
        ax.set(title=key, xlabel="step")
    axes[0].legend(fontsize="small")
    return _save(fig, out, "moe_health.png")


def report(run_dir: str, out: str | None = None) -> list[str]:
    """Write the plots for `run_dir` into `out` (default RUN_DIR/report); returns their paths."""
    records = read_metrics(run_dir)
    out = out or os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    paths = [_curves(records, out)]
    if records[-1].get("moe", {}).get("tokens_per_expert"):
        paths += [_load_over_time(records, out), _health(records, out)]
        paths.append(_save(expert_load_figure(records[-1]["moe"]["tokens_per_expert"], records[-1]["step"]), out,
                           "expert_load_last.png"))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scimoe-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="folder for the PNGs (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        paths = report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"scimoe-report: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(paths))


if __name__ == "__main__":
    main()
