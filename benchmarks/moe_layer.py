"""MoE layer forward+backward (fp32, CPU): scimoe vs megatron-core 0.16 MoELayer vs the no-routing floor.

Run: `python benchmarks/moe_layer.py [--iters 5]`. Prints milliseconds and ratios to the floor (one
SwiGLU matmul over all T·K token copies: the same active FLOPs with no routing), measured in the same
process. megatron-core runs its local spec (SequentialMLP experts, alltoall dispatcher) through
scimoe's CPU shim; its router is plain top-K (same FLOPs as grouped top-K). Balance losses are off in
both so the layers do the same work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from scimoe.config import MoEConfig
from scimoe.model.moe.layer import MoELayer

SHAPES = [
    # name, E, K, G, hidden, ffn, tokens
    ("many small experts (Intern-S1-Pro regime)", 512, 8, 8, 256, 128, 4096),
    ("few large experts", 64, 8, 8, 512, 256, 8192),
]


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def scimoe_layer(e, k, g, h, f, t):
    layer = MoELayer(h, MoEConfig(num_experts=e, top_k=k, n_groups=g, ffn_hidden=f, aux_loss_coef=0.0,
                                  group_balance_coef=0.0, router_mode="ste"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, t, h, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x)
        y.sum().backward()
    return step


def floor(e, k, g, h, f, t):
    copies = torch.randn(t * k, h, requires_grad=True)
    w_gate_up = torch.randn(2 * f, h, requires_grad=True)
    w_down = torch.randn(h, f, requires_grad=True)

    def step():
        gate, up = (copies @ w_gate_up.t()).chunk(2, dim=-1)
        (F.silu(gate) * up @ w_down.t()).sum().backward()
    return step


def megatron_layer(e, k, g, h, f, t):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer as McoreMoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1, hidden_size=h, num_attention_heads=4, ffn_hidden_size=f, moe_ffn_hidden_size=f,
        num_moe_experts=e, moe_router_topk=k, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none", use_cpu_initialization=True, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, moe_grouped_gemm=False, params_dtype=torch.float32)
    spec = get_gpt_layer_local_spec(num_experts=e, moe_grouped_gemm=False)
    layer = McoreMoELayer(cfg, spec.submodules.mlp.submodules)
    x = torch.randn(t, 1, h, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x)
        y.sum().backward()
    return step


def init_megatron() -> bool:
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from scimoe.parallel.cpu_shim import apply_cpu_shim
    except ImportError as err:
        print(f"megatron-core unavailable ({err}); skipping that column")
        return False
    apply_cpu_shim()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    have_mcore = init_megatron()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward+backward, median of {args.iters}")
    for name, *shape in SHAPES:
        e, k, g, h, f, t = shape
        base = _time(floor(*shape), args.iters)
        ours = _time(scimoe_layer(*shape), args.iters)
        print(f"\n{name}: E={e} K={k} G={g} hidden={h} ffn={f} tokens={t}")
        print(f"  floor (one SwiGLU over T·K copies) {base:8.1f} ms   1.00x")
        print(f"  scimoe MoELayer                    {ours:8.1f} ms   {ours / base:.2f}x floor")
        if have_mcore:
            mc = _time(megatron_layer(*shape), args.iters)
            print(f"  megatron-core MoELayer             {mc:8.1f} ms   {mc / base:.2f}x floor")
            print(f"  scimoe / megatron-core: {ours / mc:.2f}x time ({mc / ours:.2f}x faster)")


if __name__ == "__main__":
    main()
