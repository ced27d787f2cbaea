"""GRPO cost on CPU: rollout tokens/s with and without the KV cache, and one GRPO step split into
rollout, old/reference log-probs and update.

Run: `python benchmarks/rollout.py`. The tiny preset (hidden 128, 4 layers, 16 experts top-4, FoPE) samples
8 completions of a 32-token prompt, 96 new tokens each (no EOS), both ways with the same generator, and
the cached run is checked to produce the same tokens; the median of 3 counts. The GRPO step uses the
same model with a KL reference (so all three phases do work), 4 prompts × 8 samples × 32 new tokens; then the
same split for the multi-turn tool toy (recipe=grpo_tools), whose trajectories decode one by one.
Layouts: benchmarks/rollout_layouts.py.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from scimoe.config import ModelConfig
from scimoe.config import compose_config
from scimoe.model import build_model
from scimoe.rl.generate import sample
from scimoe.rl.grpo import grpo


def rollout_rate(use_cache: bool, model, prompt, new: int) -> tuple[float, torch.Tensor]:
    times, tokens = [], None
    for _ in range(3):
        began = time.perf_counter()
        out = sample(model, prompt, n=8, max_new=new, eos_id=-1, temperature=1.0, top_k=0, top_p=1.0,
                     generator=torch.Generator().manual_seed(0), use_cache=use_cache)
        times.append(time.perf_counter() - began)
        tokens = out.tokens
    return 8 * new / statistics.median(times), tokens


def main() -> None:
    torch.set_num_threads(2)
    model = build_model(ModelConfig(zero_init_output=False), seed=0)
    prompt = list(range(20, 52))
    new = 96
    full, full_tokens = rollout_rate(False, model, prompt, new)
    cached, cached_tokens = rollout_rate(True, model, prompt, new)
    assert torch.equal(full_tokens, cached_tokens), "the KV cache changed the samples"
    print(f"rollout, 8 × {new} new tokens after a {len(prompt)}-token prompt (tiny preset):")
    print(f"  full recomputation {full:8.0f} tok/s\n  KV cache           {cached:8.0f} tok/s   ({cached / full:.1f}×)")
    cfg = compose_config(["recipe=grpo", "model=tiny", "train.steps=3", "grpo.prompts_per_step=4",
                          "grpo.max_new_tokens=32", "grpo.kl_coef=0.05", "logger=none"])
    step_split("GRPO step (4 prompts × 8 samples × ≤32 tokens, tiny preset, char prompts)", grpo(cfg, tempfile.mkdtemp()))
    tools = compose_config(["recipe=grpo_tools", "train.steps=3", "grpo.prompts_per_step=4", "logger=none"])
    step_split("GRPO step with tools (lookup toy: 4 prompts × 8 trajectories, one tool call each, tiny_rl)",
               grpo(tools, tempfile.mkdtemp()))


def step_split(title: str, records: list[dict]) -> None:
    r = records[-1]
    total = r["rollout_s"] + r["logprob_s"] + r["update_s"]
    print(f"{title}: {total:.2f} s")
    for phase in ("rollout_s", "logprob_s", "update_s"):
        print(f"  {phase[:-2]:<8} {r[phase]:6.2f} s  {r[phase] / total:5.1%}")


if __name__ == "__main__":
    main()
