"""Name and config mapping between scimoe's single-process state dict and Hugging Face folders.

Tested by `python -m pytest tests/train/test_hf_export.py`. Two layouts:
- `intern_s1_pro`: Intern-S1-Pro's published layout (`../shared/reference/intern_s1_pro_config.json`):
  text weights under `model.language_model.`, config nested in `text_config`, experts one per name
  (`mlp.experts.{e}.{gate,up,down}_proj.weight`), the router as `mlp.gate.weight`.
- `qwen3_moe`: the same weights under `model.` with a flat `Qwen3MoeForCausalLM` config, for text-only
  models with RoPE and one router group, which transformers then runs as-is.
scimoe's fused experts (gate_up_proj [E, 2F, H], gate rows first; down_proj [E, H, F]) are split per
expert on export and stacked back on import. Training-only state (the aux-free routing bias, the STE-EMA
expert outputs, the FoPE mixing matrices) is written in the Intern-S1-Pro layout under scimoe's names
(`mlp.gate.e_score_correction_bias`, `mlp.gate.expert_output_ema`, `rotary_emb.{cos,sin}_coef`).
"""
from __future__ import annotations

import re
from typing import Iterator

import torch

from scimoe.config import ModelConfig, MoEConfig

LAYOUTS = ("intern_s1_pro", "qwen3_moe")
_PREFIX = {"intern_s1_pro": "model.language_model.", "qwen3_moe": "model."}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# scimoe name inside a layer → HF name inside a layer (experts handled separately)
_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    **{f"self_attn.{n}.weight": f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
    **{f"mlp.{n}.weight": f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")},  # dense layers
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.selection_bias": "mlp.gate.e_score_correction_bias",
    "mlp.expert_output_ema": "mlp.gate.expert_output_ema",
}
_TRAINING_ONLY = ("mlp.router.selection_bias", "mlp.expert_output_ema")


def check_exportable(cfg: ModelConfig, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    if cfg.moe.shared_expert_ffn:
        raise ValueError("model.moe.shared_expert_ffn > 0: Intern-S1-Pro's and Qwen3-MoE's layouts have no shared "
                         "expert, so this model cannot be exported to them")
    if layout == "qwen3_moe" and (cfg.pos_emb != "rope" or cfg.moe.n_groups != 1):
        raise ValueError(f"layout qwen3_moe needs model.pos_emb=rope and model.moe.n_groups=1 (Qwen3-MoE has "
                         f"neither FoPE nor grouped routing); this model has {cfg.pos_emb}, G={cfg.moe.n_groups}")


def to_hf(name: str, tensor: torch.Tensor, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one scimoe tensor (several for fused experts; none for dropped state)."""
    prefix = _PREFIX[layout]
    if name in ("embed_tokens.weight", "norm.weight"):
        yield prefix + name, tensor
        return
    if name == "lm_head.weight":
        yield name, tensor
        return
    if name.startswith("rotary."):
        if layout == "intern_s1_pro":
            yield prefix + "rotary_emb." + name.split(".", 1)[1], tensor
        return
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"no Hugging Face name for '{name}'")
    i, rest = match.groups()
    base = f"{prefix}layers.{i}."
    if rest == "mlp.experts.gate_up_proj":
        f = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"{base}mlp.experts.{e}.gate_proj.weight", tensor[e, :f]
            yield f"{base}mlp.experts.{e}.up_proj.weight", tensor[e, f:]
    elif rest == "mlp.experts.down_proj":
        for e in range(tensor.shape[0]):
            yield f"{base}mlp.experts.{e}.down_proj.weight", tensor[e]
    elif rest in _TRAINING_ONLY:
        if layout == "intern_s1_pro":
            yield base + _IN_LAYER[rest], tensor
        elif rest == "mlp.router.selection_bias" and bool(tensor.any()):
            raise ValueError(f"'{name}' (the aux-loss-free routing bias) is non-zero: Qwen3-MoE routing has no "
                             "bias, so the exported model would route differently; use layout intern_s1_pro")
    elif rest in _IN_LAYER:
        yield base + _IN_LAYER[rest], tensor
    else:
        raise KeyError(f"no Hugging Face name for '{name}'")


def from_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """scimoe's single-process state dict from HF weights (either layout); fills training-only state
    that the folder lacks with its initial value (zeros)."""
    prefix = next((p for p in _PREFIX.values() if f"{p}embed_tokens.weight" in weights), None)
    if prefix is None:
        raise ValueError("no embed_tokens.weight under model.language_model. or model.: not an Intern-S1-Pro "
                         "or Qwen3-MoE folder")
    inverse = {v: k for k, v in _IN_LAYER.items()}
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    expert_name = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for hf_name, t in weights.items():
        if hf_name == "lm_head.weight":
            state[hf_name] = t
            continue
        if not hf_name.startswith(prefix):
            continue  # another tower (vision, time series)
        rest = hf_name[len(prefix):]
        if rest in ("embed_tokens.weight", "norm.weight"):
            state[rest] = t
        elif rest.startswith("rotary_emb."):
            state["rotary." + rest.split(".", 1)[1]] = t
        elif m := expert_name.match(rest):
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = t
        elif (m := _LAYER.match(rest)) and m.group(2) in inverse:
            state[f"layers.{m.group(1)}.{inverse[m.group(2)]}"] = t
        else:
            raise KeyError(f"unexpected weight '{hf_name}' in the Hugging Face folder")
    for layer in sorted({i for i, _ in experts}):
        def stack(kind: str) -> torch.Tensor:
            per_expert = experts.get((layer, kind), {})
            if sorted(per_expert) != list(range(cfg.moe.num_experts)):
                raise ValueError(f"layer {layer}: {kind} present for {len(per_expert)} of {cfg.moe.num_experts} experts")
            return torch.stack([per_expert[e] for e in range(cfg.moe.num_experts)])
        state[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        state[f"layers.{layer}.mlp.experts.down_proj"] = stack("down_proj")
    for i in range(cfg.moe.dense_layers, cfg.layers):
        state.setdefault(f"layers.{i}.mlp.router.selection_bias", torch.zeros(cfg.moe.num_experts))
        state.setdefault(f"layers.{i}.mlp.expert_output_ema", torch.zeros(cfg.moe.num_experts, cfg.hidden))
    return state


def hf_config(cfg: ModelConfig, layout: str) -> dict:
    """config.json for `layout`."""
    text = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": cfg.max_positions, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "moe_intermediate_size": cfg.moe.ffn_hidden, "num_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k, "norm_topk_prob": cfg.moe.norm_topk_prob,
        "decoder_sparse_step": 1, "mlp_only_layers": list(range(cfg.moe.dense_layers)),
        "intermediate_size": cfg.moe.dense_ffn_hidden or cfg.moe.ffn_hidden,
        "initializer_range": cfg.init_std, "rope_theta": cfg.rope_theta,
    }
    if layout == "qwen3_moe":
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **text,
                "rope_parameters": rope, "router_aux_loss_coef": cfg.moe.aux_loss_coef, "output_router_logits": False}
    text.update(model_type="interns1_pro_text", router_n_groups=cfg.moe.n_groups,
                rope_scaling={"rope_type": "default", "fope_init_factor": cfg.fope_init_factor,
                              "fope_sep_head": cfg.fope_sep_head, "num_inv_freq": None} if cfg.pos_emb == "fope" else
                {"rope_type": "default"}, scimoe_pos_emb=cfg.pos_emb)
    return {"architectures": ["InternS1ProForConditionalGeneration"], "model_type": "interns1_pro",
            "tie_word_embeddings": False, "text_config": text}


def model_config(config: dict) -> ModelConfig:
    """scimoe's ModelConfig from an Intern-S1-Pro or Qwen3-MoE config.json."""
    text = config.get("text_config", config)
    rope_theta = text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta", 1e6)
    scaling = text.get("rope_scaling") or {}
    pos_emb = text.get("scimoe_pos_emb") or ("fope" if "fope_init_factor" in scaling else "rope")
    dense = text.get("mlp_only_layers") or []
    if dense != list(range(len(dense))):
        raise ValueError(f"mlp_only_layers {dense}: scimoe supports dense layers only at the start")
    moe = MoEConfig(num_experts=text["num_experts"], top_k=text["num_experts_per_tok"],
                    n_groups=text.get("router_n_groups", 1), ffn_hidden=text["moe_intermediate_size"],
                    norm_topk_prob=text.get("norm_topk_prob", True), dense_layers=len(dense),
                    dense_ffn_hidden=text["intermediate_size"] if dense else 0)
    return ModelConfig(name=config.get("model_type", "hf"), vocab_size=text["vocab_size"], hidden=text["hidden_size"],
                       layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                       kv_heads=text["num_key_value_heads"],
                       head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
                       rms_eps=text.get("rms_norm_eps", 1e-6), pos_emb=pos_emb, rope_theta=float(rope_theta),
                       max_positions=text.get("max_position_embeddings", 4096),
                       fope_init_factor=scaling.get("fope_init_factor", 0.5),
                       fope_sep_head=scaling.get("fope_sep_head", True), init_std=text.get("initializer_range", 0.02),
                       moe=moe)
