"""Name and config mapping between scimoe's single-process state dict and Hugging Face folders.

Tested by `python -m pytest tests/train/test_hf_export.py tests/model/test_released_model.py`. Two layouts:
- `intern_s1_pro`: the released Intern-S1-Pro (`../shared/reference/intern_s1_pro_config.json`): the language
  model under `model.language_model.` (experts one per name, `mlp.experts.{e}.{gate,up,down}_proj.weight`, the
  router as `mlp.gate.weight`, FoPE tables as `rotary_emb.{cos,sin}_coef`), the vision tower under
  `model.visual.`, the time-series tower under `model.time_series.` (LMDeploy's names), `lm_head.weight`;
  config nested in `text_config`, `vision_config`, `ts_config`.
- `qwen3_moe`: the language model under `model.` with a flat `Qwen3MoeForCausalLM` config, for text-only models
  with RoPE and one router group, which transformers runs as-is.
Import also reads transformers 5's files: `num_local_experts`, and experts saved fused
(`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj` [E, H, F], scimoe's own layout). What a layout
cannot represent (another activation or rope type, tied embeddings, attention biases, a non-zero aux-free
selection bias the released code would ignore) is refused naming the config field. Training-only state (the
STE-EMA expert outputs) is not exported: it is not part of the function the weights compute.
"""
from __future__ import annotations

import math
import re
from typing import Iterator

import torch

from scimoe.config import ConfigError, ModelConfig, MoEConfig, TimeSeriesModelConfig, VisionModelConfig

LAYOUTS = ("intern_s1_pro", "qwen3_moe")
_PREFIX = {"intern_s1_pro": "model.language_model.", "qwen3_moe": "model."}
_TOWERS = {"vision.": "model.visual.", "timeseries.": "model.time_series."}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# scimoe name inside a layer → HF name inside a layer (experts handled separately)
_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    **{f"self_attn.{n}.weight": f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
    **{f"mlp.{n}.weight": f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")},  # dense layers
    "mlp.router.weight": "mlp.gate.weight",
}
_TRAINING_ONLY = ("mlp.router.selection_bias", "mlp.expert_output_ema")


def refuse(key: str, message: str) -> None:
    raise ConfigError(f"config error at '{key}': {message}")


def check_exportable(cfg: ModelConfig, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    if cfg.moe.shared_expert_ffn:
        refuse("model.moe.shared_expert_ffn", "Intern-S1-Pro's and Qwen3-MoE's layouts have no shared expert")
    if layout == "qwen3_moe" and (cfg.pos_emb != "rope" or cfg.moe.n_groups != 1 or cfg.vision.enabled
                                  or cfg.timeseries.enabled):
        refuse("model.pos_emb", f"layout qwen3_moe is text-only with RoPE and one router group; this model has "
                                f"{cfg.pos_emb}, G={cfg.moe.n_groups}, vision {cfg.vision.enabled}, time series "
                                f"{cfg.timeseries.enabled}")


def to_hf(name: str, tensor: torch.Tensor, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one scimoe tensor (several for fused experts; none for training-only state)."""
    prefix = _PREFIX[layout]
    for ours, theirs in _TOWERS.items():
        if name.startswith(ours):
            yield theirs + name[len(ours):], tensor
            return
    if name in ("embed_tokens.weight", "norm.weight"):
        yield prefix + name, tensor
    elif name == "lm_head.weight":
        yield name, tensor
    elif name.startswith("rotary."):
        yield prefix + "rotary_emb." + name.split(".", 1)[1], tensor[0] if tensor.shape[0] == 1 else tensor
    elif match := _LAYER.match(name):
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
        elif rest == "mlp.router.selection_bias":
            if bool(tensor.any()):
                refuse("model.moe.bias_update_rate", f"'{name}' (the aux-loss-free routing bias) is non-zero, and the "
                       f"{layout} layout's code routes without it: the exported model would route differently")
        elif rest in _IN_LAYER:
            yield base + _IN_LAYER[rest], tensor
        elif rest not in _TRAINING_ONLY:
            raise KeyError(f"no Hugging Face name for '{name}'")
    else:
        raise KeyError(f"no Hugging Face name for '{name}'")


def from_hf_name(hf_name: str, prefix: str) -> str | None:
    """scimoe's name for a HF weight (experts: see EXPERT; None: not a weight scimoe keeps)."""
    if hf_name == "lm_head.weight":
        return hf_name
    for ours, theirs in _TOWERS.items():
        if hf_name.startswith(theirs):
            return ours + hf_name[len(theirs):]
    if not hf_name.startswith(prefix):
        return None
    rest = hf_name[len(prefix):]
    if rest in ("embed_tokens.weight", "norm.weight"):
        return rest
    if rest.startswith("rotary_emb."):
        return "rotary." + rest.split(".", 1)[1]
    if EXPERT.match(rest) or rest.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        return rest
    inverse = {v: k for k, v in _IN_LAYER.items()}
    inverse.update({"mlp.gate.e_score_correction_bias": "mlp.router.selection_bias",  # earlier scimoe exports
                    "mlp.gate.expert_output_ema": "mlp.expert_output_ema"})
    if (m := _LAYER.match(rest)) and m.group(2) in inverse:
        return f"layers.{m.group(1)}.{inverse[m.group(2)]}"
    return None


def _number(x: float):
    """Integers stay integers in config.json (rope_theta 5000000, not 5000000.0)."""
    return int(x) if float(x).is_integer() else x


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
        "initializer_range": cfg.init_std, "rope_theta": _number(cfg.rope_theta),
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }
    if layout == "qwen3_moe":
        rope = {"rope_type": "default", "rope_theta": _number(cfg.rope_theta)}
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **text,
                "rope_parameters": rope, "router_aux_loss_coef": cfg.moe.aux_loss_coef, "output_router_logits": False}
    text.update(model_type="interns1_pro_text", router_n_groups=cfg.moe.n_groups,
                rope_scaling={"rope_type": "default", "fope_init_factor": cfg.fope_init_factor,
                              "fope_sep_head": cfg.fope_sep_head, "num_inv_freq": None} if cfg.pos_emb == "fope" else
                {"rope_type": "default"})
    config = {"architectures": ["InternS1ProForConditionalGeneration"], "model_type": "interns1_pro",
              "tie_word_embeddings": False, "text_config": text, "image_token_id": cfg.image_token_id,
              "ts_token_id": cfg.ts_token_id,
              **{k: getattr(cfg, k) for k in ("video_token_id", "vision_start_token_id", "vision_end_token_id")
                 if getattr(cfg, k) >= 0}}
    if cfg.vision.enabled:
        v = cfg.vision
        config["vision_config"] = {
            "model_type": "interns1_pro_vision", "depth": v.layers, "hidden_size": v.hidden, "num_heads": v.heads,
            "intermediate_size": v.mlp, "num_position_embeddings": v.grid * v.grid, "out_hidden_size": cfg.hidden,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "initializer_range": cfg.init_std}
    if cfg.timeseries.enabled:
        t = cfg.timeseries
        config["ts_config"] = {
            "d_model": t.hidden, "encoder_layers": t.layers, "encoder_attention_heads": t.heads,
            "encoder_ffn_dim": t.ffn, "num_mel_bins": t.mel_bins, "max_source_positions": t.max_source_positions,
            "ts_adapt_in_dim": 2 * t.embed_hidden, "ts_adapt_out_dim": t.adapt_out, "ts_hidden_dim": t.adapt_out,
            "out_hidden_size": cfg.hidden, "activation_function": t.activation, "scale_embedding": False,
            # LMDeploy fixes the per-patch encoder at 128 wide, 8 heads, ffn 2048, one layer
            "scimoe_embed_hidden": t.embed_hidden, "scimoe_embed_heads": t.embed_heads,
            "scimoe_embed_ffn": t.embed_ffn, "scimoe_embed_layers": t.embed_layers}
    return config


def _vision_config(v: dict, lm_hidden: int) -> VisionModelConfig:
    for key, want in (("patch_size", 16), ("temporal_patch_size", 2), ("spatial_merge_size", 2), ("in_channels", 3),
                      ("hidden_act", "gelu_pytorch_tanh"), ("out_hidden_size", lm_hidden)):
        if v.get(key, want) != want:
            refuse(f"vision_config.{key}", f"scimoe's vision tower has {want}, the folder {v[key]!r}")
    grid = math.isqrt(v["num_position_embeddings"])
    if grid * grid != v["num_position_embeddings"]:
        refuse("vision_config.num_position_embeddings", f"{v['num_position_embeddings']} is not a square grid")
    return VisionModelConfig(enabled=True, hidden=v["hidden_size"], layers=v["depth"], heads=v["num_heads"],
                             mlp=v["intermediate_size"], grid=grid, min_pixels=65536, max_pixels=16777216)


def _ts_config(t: dict, lm_hidden: int) -> TimeSeriesModelConfig:
    embed = t.get("scimoe_embed_hidden", 128)
    if t.get("ts_adapt_in_dim", 2 * embed) != 2 * embed:
        refuse("ts_config.ts_adapt_in_dim", f"must be twice the per-patch width ({2 * embed}), got {t['ts_adapt_in_dim']}")
    if t.get("out_hidden_size", lm_hidden) != lm_hidden:
        refuse("ts_config.out_hidden_size", f"must be the language model's hidden size {lm_hidden}")
    return TimeSeriesModelConfig(
        enabled=True, embed_hidden=embed, embed_heads=t.get("scimoe_embed_heads", 8),
        embed_ffn=t.get("scimoe_embed_ffn", 2048), embed_layers=t.get("scimoe_embed_layers", 1), hidden=t["d_model"],
        layers=t["encoder_layers"], heads=t["encoder_attention_heads"], ffn=t["encoder_ffn_dim"],
        mel_bins=t.get("num_mel_bins", 80), max_source_positions=t.get("max_source_positions", 1500),
        adapt_out=t["ts_adapt_out_dim"], activation=t.get("activation_function", "gelu"))


def model_config(config: dict) -> ModelConfig:
    """scimoe's ModelConfig from an Intern-S1-Pro or Qwen3-MoE config.json; what scimoe cannot compute is refused
    naming the field."""
    nested = "text_config" in config
    text = config.get("text_config", config)
    key = (lambda k: f"text_config.{k}") if nested else (lambda k: k)  # noqa: E731
    if text.get("hidden_act", "silu") != "silu":
        refuse(key("hidden_act"), f"scimoe's experts are SwiGLU (silu), the folder has {text['hidden_act']!r}")
    if text.get("attention_bias") or text.get("mlp_bias"):
        refuse(key("attention_bias"), "scimoe's projections have no bias")
    for where, source in (("tie_word_embeddings", config), (key("tie_word_embeddings"), text)):
        if source.get("tie_word_embeddings"):
            refuse(where, "scimoe's LM head is untied from the embedding")
    if text.get("decoder_sparse_step", 1) != 1:
        refuse(key("decoder_sparse_step"), "scimoe has MoE in every layer but the leading mlp_only_layers")
    scaling = dict(text.get("rope_scaling") or {})
    parameters = dict(text.get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", parameters.get("rope_type", "default")))
    if rope_type != "default":
        refuse(key("rope_scaling.rope_type"), f"scimoe computes default RoPE or FoPE only, the folder asks for "
                                              f"{rope_type!r}")
    if "mrope_section" in scaling or scaling.get("mrope_interleaved"):
        refuse(key("rope_scaling.mrope_section"), "scimoe's positions are one-dimensional (multimodal RoPE sections, "
                                                  "as in Qwen3-VL, are not built)")
    if scaling.get("num_inv_freq") is not None:
        refuse(key("rope_scaling.num_inv_freq"), "scimoe keeps the frequencies above 2π/max_position_embeddings, "
                                                 "not a fixed number of them")
    rope_theta = text.get("rope_theta") or parameters.get("rope_theta", 1e6)
    fope = any(k in scaling for k in ("fope_init_factor", "fope_sep_head"))
    dense = text.get("mlp_only_layers") or []
    if dense != list(range(len(dense))):
        refuse(key("mlp_only_layers"), f"{dense}: scimoe supports dense layers only at the start")
    experts = text.get("num_experts", text.get("num_local_experts"))
    if experts is None:
        refuse(key("num_experts"), "missing (neither num_experts nor num_local_experts)")
    moe = MoEConfig(num_experts=experts, top_k=text["num_experts_per_tok"], n_groups=text.get("router_n_groups", 1),
                    ffn_hidden=text["moe_intermediate_size"], norm_topk_prob=text.get("norm_topk_prob", True),
                    dense_layers=len(dense), dense_ffn_hidden=text["intermediate_size"] if dense else 0)
    hidden = text["hidden_size"]
    ids = {k: config[k] for k in ("image_token_id", "ts_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id") if isinstance(config.get(k), int)}
    ids.update({k: text[k] for k in ("bos_token_id", "eos_token_id") if isinstance(text.get(k), int)})
    return ModelConfig(name=config.get("model_type", "hf"), vocab_size=text["vocab_size"], hidden=hidden,
                       layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                       kv_heads=text["num_key_value_heads"],
                       head_dim=text.get("head_dim") or hidden // text["num_attention_heads"],
                       rms_eps=text.get("rms_norm_eps", 1e-6), pos_emb="fope" if fope else "rope",
                       rope_theta=float(rope_theta), max_positions=text.get("max_position_embeddings", 4096),
                       fope_init_factor=scaling.get("fope_init_factor", 0.5),
                       fope_sep_head=scaling.get("fope_sep_head", True), init_std=text.get("initializer_range", 0.02),
                       moe=moe, **ids,
                       vision=_vision_config(config["vision_config"], hidden) if "vision_config" in config
                       else VisionModelConfig(),
                       timeseries=_ts_config(config["ts_config"], hidden) if config.get("ts_config")
                       else TimeSeriesModelConfig())
