"""One layer's attention over a packed row: peak memory and time, the dense [T, T] document mask (the path
before issue #14) vs document boundaries (`scimoe.model.attention.Documents`, today's path).

Run: `python benchmarks/attention_memory.py [--tokens 4096 16384 65536]`. The attention module has the tiny
preset's shapes (hidden 128, 8 query and 2 KV heads of 16); each row is packed from documents of mixed lengths
(seeded, 16 tokens to a quarter of the row). Every measurement runs in a fresh process (forward and backward,
fp32, 2 threads) so one cannot inherit the other's freed memory; peak resident memory is sampled every
millisecond. The dense path is skipped where its mask and scores alone would not fit in --max-gib.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scimoe.config import ModelConfig  # noqa: E402
from scimoe.model.attention import Attention  # noqa: E402
from scimoe.model.documents import Documents, document_causal_mask  # noqa: E402


def packed_positions(tokens: int) -> torch.Tensor:
    gen, lengths, left = torch.Generator().manual_seed(tokens), [], tokens
    while left:
        n = min(left, int(torch.randint(16, max(17, tokens // 4), (1,), generator=gen)))
        lengths.append(n)
        left -= n
    return torch.cat([torch.arange(n) for n in lengths]).view(1, tokens)


def dense_forward(attn: Attention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The former path: the same projections, SDPA with the dense document mask."""
    b, t, _ = x.shape
    q = attn.q_norm(attn.q_proj(x).view(b, t, attn.heads, attn.head_dim))
    k = attn.k_norm(attn.k_proj(x).view(b, t, attn.kv_heads, attn.head_dim))
    v = attn.v_proj(x).view(b, t, attn.kv_heads, attn.head_dim)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=document_causal_mask(positions), enable_gqa=True)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def one(path: str, tokens: int) -> dict:
    from tests.peak_memory import peak_rss_during

    torch.set_num_threads(2)
    cfg = ModelConfig()
    attn = Attention(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rms_eps)
    positions = packed_positions(tokens)
    x = torch.randn(1, tokens, cfg.hidden, requires_grad=True)
    rotary = (torch.ones(1, tokens, cfg.kv_heads, cfg.head_dim), torch.zeros(1, tokens, cfg.kv_heads, cfg.head_dim))

    def run() -> float:
        start = time.perf_counter()
        if path == "dense":
            out = dense_forward(attn, x, positions)
        else:
            out = attn(x, rotary, Documents.from_positions(positions))
        out.sum().backward()
        return time.perf_counter() - start

    seconds, peak = peak_rss_during(run)
    return {"seconds": seconds, "peak_mib": peak / 2**20, "documents": int((positions == 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--max-gib", type=float, default=12.0)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    print(f"{'tokens':>7} {'docs':>5} {'dense MiB':>10} {'dense s':>8} {'spans MiB':>10} {'spans s':>8} {'memory':>8} {'time':>7}")
    for tokens in args.tokens:
        results = {}
        dense_gib = tokens * tokens * 5 / 2**30  # the bool mask and SDPA's float copy of it (CPU flash kernel)
        for path in ("dense", "spans"):
            if path == "dense" and dense_gib > args.max_gib:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", path, str(tokens)], capture_output=True,
                                 text=True, check=True)
            results[path] = json.loads(out.stdout.strip().splitlines()[-1])
        s = results["spans"]
        if "dense" in results:
            d = results["dense"]
            print(f"{tokens:>7} {s['documents']:>5} {d['peak_mib']:>10.0f} {d['seconds']:>8.2f} {s['peak_mib']:>10.0f} "
                  f"{s['seconds']:>8.2f} {s['peak_mib'] / d['peak_mib']:>7.3f}× {s['seconds'] / d['seconds']:>6.2f}×")
        else:
            print(f"{tokens:>7} {s['documents']:>5} {'(needs ≈' + format(dense_gib, '.0f') + ' GiB)':>19} "
                  f"{s['peak_mib']:>10.0f} {s['seconds']:>8.2f} {'-':>8} {'-':>7}")


if __name__ == "__main__":
    main()
