"""Data pipeline vs training on this machine, and time-series encoding cost by length.

Run: `python benchmarks/data_pipeline.py`. Measures in one run: scimoe-preprocess (tokenize + write .bin/.idx)
on the bundled corpus repeated 8×; the step loader over those rows and over multimodal rows; reading and
validating multimodal records (images decoded and resized, series parsed); and, as the baseline, what
the training loop consumes (tiny preset, and tiny_mm on the multimodal fixture). Prints each rate and the
ratio to the training loop's (the loader must stay far above 1×). Then encodes 10^3, 10^5 and 10^6-point
series with the tiny_mm time-series encoder in fresh processes (time and peak resident memory above the
model's baseline).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scimoe.data.indexed import indexed_rows  # noqa: E402
from scimoe.data.loader import StepLoader  # noqa: E402
from scimoe.data.multimodal import multimodal_rows, read_samples  # noqa: E402
from scimoe.data.preprocess import preprocess  # noqa: E402
from scimoe.data.text import bundled_corpus_path, read_documents  # noqa: E402
from scimoe.config import compose_config  # noqa: E402
from scimoe.train.pretrain import pretrain  # noqa: E402
from tests.data.mm_fixture import write_fixture  # noqa: E402

TS_SCRIPT = """
import json, sys, time, torch
from scimoe.model.timeseries import TimeSeriesConfig, TimeSeriesEncoder
from tests.peak_memory import peak_rss_during
torch.manual_seed(0); torch.set_num_threads(2)
enc = TimeSeriesEncoder(TimeSeriesConfig(), 128).eval()
x = torch.randn(int(sys.argv[1]), 1)
with torch.no_grad(): enc(torch.randn(2000, 1), 1000.0)
began = time.perf_counter()
with torch.no_grad(): out, extra = peak_rss_during(lambda: enc(x, 1000.0))
print(json.dumps({"s": time.perf_counter() - began, "tokens": out.shape[0], "mib": extra / 2**20}))
"""


def loader_rate(rows, global_batch: int, micro_batch: int) -> tuple[float, float]:
    loader = StepLoader(rows, global_batch, micro_batch, seed=0)
    steps, began = 200, time.perf_counter()
    for _ in range(steps):
        batches = loader.next_step()
    elapsed = time.perf_counter() - began
    tokens = sum(b["input_ids"].numel() for b in batches) * steps
    return steps * global_batch / elapsed, tokens / elapsed


def main() -> None:
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n\n".join(read_documents(bundled_corpus_path()) * 8))
    began = time.perf_counter()
    summary = preprocess([corpus], os.path.join(tmp, "text"), None, 384, progress=False)
    pre_s = time.perf_counter() - began
    train = pretrain(compose_config(["train.steps=6", "logger=none", "data=synthetic"]), os.path.join(tmp, "t")).records
    train_tok = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
    train_rows = train_tok / 128
    cfg = compose_config([f"data.path={os.path.join(tmp, 'text')}", "data.source=indexed", "train.seq_len=128"])
    text_rows = indexed_rows(cfg, tmp)
    text_samples, text_tok = loader_rate(text_rows, 8, 4)
    print(f"training loop (tiny, seq 128): {train_tok:,.0f} tok/s = {train_rows:,.1f} rows/s   [baseline]")
    print(f"preprocess: {summary['documents'] / pre_s:,.0f} docs/s, {summary['tokens'] / pre_s:,.0f} tok/s "
          f"({summary['tokens'] / pre_s / train_tok:.0f}× training)")
    print(f"loader, .bin/.idx rows: {text_samples:,.0f} rows/s, {text_tok:,.0f} tok/s ({text_tok / train_tok:,.0f}× training)")
    fixture = write_fixture(os.path.join(tmp, "mm"), repeats=8, bad=False)
    began = time.perf_counter()
    docs = read_samples(fixture, [])
    read_s = time.perf_counter() - began
    mm_cfg = compose_config(["model=tiny_mm", "data=multimodal", f"data.path={fixture}", "train.seq_len=512",
                             "train.global_batch=4", "train.micro_batch=2", "train.steps=6", "logger=none"])
    mm_rows = multimodal_rows(mm_cfg, os.path.join(tmp, "mmrun"))
    mm_samples, mm_tok = loader_rate(mm_rows, 4, 2)
    mm_train = pretrain(mm_cfg, os.path.join(tmp, "mmrun")).records
    mm_train_tok = sorted(r["tokens_per_s"] for r in mm_train)[len(mm_train) // 2]
    print(f"training loop (tiny_mm, seq 512): {mm_train_tok:,.0f} tok/s = {mm_train_tok / 512:,.1f} rows/s   [baseline]")
    print(f"multimodal records read + validated: {len(docs) / read_s:,.0f} records/s "
          f"(≈ {len(docs) / read_s * 512 / mm_train_tok * len(mm_rows) / len(docs):,.1f}× training's row rate)")
    print(f"loader, multimodal rows: {mm_samples:,.0f} rows/s, {mm_tok:,.0f} tok/s ({mm_tok / mm_train_tok:,.0f}× training)")
    print("time-series encoder (tiny_mm sizes, 1 channel, 1 kHz, no grad):")
    for n in (1_000, 100_000, 1_000_000):
        out = subprocess.run([sys.executable, "-c", TS_SCRIPT, str(n)], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {n:>9,} points → {r['tokens']:5d} tokens  {r['s']:7.2f} s  peak +{r['mib']:6.0f} MiB")


if __name__ == "__main__":
    main()
