"""GPU check for the parallelism issue: tiny model and a 2-layer Intern-S1-Pro-shaped slice in bf16.

Run on a machine with one GPU (≤ 10 minutes): `python benchmarks/gpu_moe_slice.py`; smoke-test the
script on a CPU with `python benchmarks/gpu_moe_slice.py --device cpu --tokens 256 --slice-experts 8`.
Prints forward+backward tokens/s and MFU of the scimoe model (tiny preset; a 2-layer slice with
hidden 4096, 64 local experts, top-8, 8 groups, Intern-S1-Pro attention) and, for the same MoE shapes,
megatron-core's MoELayer (skipped with the reason when megatron-core is missing there). MFU counts
training FLOPs per token as 6 × (active matmul parameters, LM head included) + 6 × layers × seq ×
heads × head_dim (causal attention scores and values), against `--peak-tflops` (989: H100/H200
dense bf16).
"""
from __future__ import annotations

import argparse
import time

import torch

from scimoe.config import ModelConfig, MoEConfig
from scimoe.model import build_model
from scimoe.model.counting import parameter_counts


def slice_config(experts: int) -> ModelConfig:
    return ModelConfig(name="intern_s1_pro_slice", vocab_size=155008, hidden=4096, layers=2, heads=64, kv_heads=4,
                       head_dim=128, max_positions=262144, zero_init_output=False, embed_init_std=0.02,
                       moe=MoEConfig(num_experts=experts, top_k=8, n_groups=8, ffn_hidden=1536))


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    counts = parameter_counts(cfg)
    active_matmul = counts["active"] - counts["norms"] - counts["fope"] - cfg.vocab_size * cfg.hidden  # embedding is a lookup
    return 6 * active_matmul + 6 * cfg.layers * seq * cfg.heads * cfg.head_dim


def time_model(cfg: ModelConfig, batch: int, seq: int, device: str, iters: int) -> float:
    model = build_model(cfg, seed=0).to(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    pos = torch.arange(seq, device=device).repeat(batch, 1)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(ids, pos, ids)
        (out.loss_sum / out.label_tokens + out.balance_loss).backward()
        model.zero_grad(set_to_none=True)
    return _seconds(step, device, iters)


def _seconds(step, device: str, iters: int) -> float:
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def time_megatron_moe(cfg: ModelConfig, tokens: int, device: str, iters: int) -> float | str:
    try:
        import os

        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig
    except ImportError as err:
        return f"skipped: {err}"
    if device == "cpu":
        from scimoe.parallel.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
    moe = cfg.moe
    tcfg = TransformerConfig(num_layers=1, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
                             ffn_hidden_size=moe.ffn_hidden, moe_ffn_hidden_size=moe.ffn_hidden,
                             num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k,
                             moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
                             gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
                             moe_grouped_gemm=False, bf16=True, params_dtype=torch.bfloat16,
                             use_cpu_initialization=device == "cpu")
    layer = MoELayer(tcfg, get_gpt_layer_local_spec(num_experts=moe.num_experts).submodules.mlp.submodules).to(device)
    x = torch.randn(tokens, 1, cfg.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step():
        y, _ = layer(x)
        y.float().sum().backward()
        layer.zero_grad(set_to_none=True)
    return _seconds(step, device, iters)


def time_scimoe_moe(cfg: ModelConfig, tokens: int, device: str, iters: int) -> float:
    from scimoe.model.moe.layer import MoELayer

    layer = MoELayer(cfg.hidden, cfg.moe).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, cfg.hidden, device=device, requires_grad=True)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            y, _ = layer(x)
        y.float().sum().backward()
        layer.zero_grad(set_to_none=True)
    return _seconds(step, device, iters)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch × seq)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--slice-experts", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    seq = min(args.seq, args.tokens)
    batch = max(1, args.tokens // seq)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, bf16 autocast, {batch}×{seq} tokens, mean of {args.iters} after a warm-up")
    for cfg in (ModelConfig(), slice_config(args.slice_experts)):
        s = time_model(cfg, batch, min(seq, cfg.max_positions), args.device, args.iters)
        tps = batch * seq / s
        mfu = tps * flops_per_token(cfg, seq) / (args.peak_tflops * 1e12)
        print(f"{cfg.name:22s} fwd+bwd {s * 1e3:8.1f} ms  {tps:10.0f} tokens/s  MFU {100 * mfu:5.1f}%")
    cfg = slice_config(args.slice_experts)
    ours = time_scimoe_moe(cfg, batch * seq, args.device, args.iters)
    theirs = time_megatron_moe(cfg, batch * seq, args.device, args.iters)
    print(f"MoE layer only (hidden 4096, {args.slice_experts} experts, top-8): scimoe {ours * 1e3:.1f} ms", end="")
    print(f", megatron-core {theirs * 1e3:.1f} ms ({theirs / ours:.2f}x ours)" if isinstance(theirs, float) else f", megatron-core {theirs}")


if __name__ == "__main__":
    main()
