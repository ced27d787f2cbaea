"""Parameter counts from the config alone, by component (the formula the 1T hand count uses).

Tested by `python -m pytest tests/model/test_param_count.py` against the model built on the meta device.
With H hidden, L layers (L_moe of them MoE), n_q/n_kv heads of width d, E experts of width F, top-K, V vocab:
  attention  = L·(H·d·(n_q + 2·n_kv) + n_q·d·H + 2·d)        q,k,v,o projections + q/k norms
  experts    = L_moe·E·3·H·F                                   gate, up, down of each SwiGLU expert
  routers    = L_moe·E·H
  embedding  = 2·V·H                                           embedding + untied LM head
  norms      = (2·L + 1)·H,  dense/shared MLPs = 3·H·F_dense each,  fope = 2·tables·D² (only when trained;
               the released model keeps them as buffers)
  active     = total − L_moe·(E − K)·3·H·F                     a token runs only K experts

Training FLOPs per token (`training_flops_per_token`, the numerator of MFU), for sequences of S tokens:
  6·N_matmul + 6·L·n_q·d·S
where N_matmul are the weights a token multiplies by (q,k,v,o, its K experts and any shared/dense MLP,
the router, the LM head; not the embedding lookup, norms or FoPE tables); 6 = 2 FLOPs per multiply-add
× (forward + 2× in backward). The attention term is QKᵀ and AV: 2·2·n_q·d FLOPs per (query, key) pair
forward, S/2 keys per query on average under the causal mask, times 3 for the backward. Document masks
of packed sequences make real attention cheaper; MFU counts the causal S/2, as Megatron and PaLM do.
"""
from __future__ import annotations

from scimoe.config import ModelConfig
from scimoe.model.rotary import kept_frequency_count


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by component plus `total`, `active` and `active_no_embedding` (per token)."""
    h, d, moe = cfg.hidden, cfg.head_dim, cfg.moe
    moe_layers = cfg.layers - moe.dense_layers
    counts = {
        "attention": cfg.layers * (h * d * (cfg.heads + 2 * cfg.kv_heads) + cfg.heads * d * h + 2 * d),
        "experts": moe_layers * moe.num_experts * 3 * h * moe.ffn_hidden,
        "routers": moe_layers * moe.num_experts * h,
        "embedding": 2 * cfg.vocab_size * h,
        "norms": (2 * cfg.layers + 1) * h,
        "dense_mlp": moe.dense_layers * 3 * h * moe.dense_ffn_hidden + moe_layers * 3 * h * moe.shared_expert_ffn,
        "fope": 0,
    }
    if cfg.pos_emb == "fope" and cfg.fope_trainable:  # otherwise buffers, as released: not parameters
        tables = cfg.kv_heads if cfg.fope_sep_head else 1
        counts["fope"] = 2 * tables * kept_frequency_count(d, cfg.rope_theta, cfg.max_positions) ** 2
    total = sum(counts.values())
    inactive = moe_layers * (moe.num_experts - moe.top_k) * 3 * h * moe.ffn_hidden
    counts.update(total=total, active=total - inactive, active_no_embedding=total - inactive - counts["embedding"])
    return counts


def matmul_parameters_per_token(cfg: ModelConfig) -> int:
    """Weights one token is multiplied by: attention projections, K routed experts, shared/dense MLPs,
    routers and the LM head."""
    h, d, moe = cfg.hidden, cfg.head_dim, cfg.moe
    moe_layers = cfg.layers - moe.dense_layers
    attention = cfg.layers * h * d * (2 * cfg.heads + 2 * cfg.kv_heads)
    experts = moe_layers * (moe.top_k * 3 * h * moe.ffn_hidden + moe.num_experts * h + 3 * h * moe.shared_expert_ffn)
    dense = moe.dense_layers * 3 * h * moe.dense_ffn_hidden
    return attention + experts + dense + cfg.vocab_size * h


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward), the formula in this file's docstring."""
    return 6.0 * matmul_parameters_per_token(cfg) + 6.0 * cfg.layers * cfg.heads * cfg.head_dim * seq_len
