"""Structured configuration: every key a run accepts, with its type, default and meaning.

Usage: `scimoe-train model=tiny train.steps=50` composes `scimoe/configs/config.yaml` over the
dataclasses below (registered in Hydra's ConfigStore as `scimoe_schema`), so an unknown key or a
wrong type is refused by OmegaConf before any work. Cross-field checks live in `__post_init__` and
run when `validate(cfg)` turns the composed config into these dataclasses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from omegaconf import DictConfig


class ConfigError(ValueError):
    """A key, value or combination the run cannot use; the message names the key. `scimoe-train` exits 2."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error at '{key}': {message}")


def _positive(obj, prefix: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        _require(getattr(obj, key) > 0, f"{prefix}.{key}", f"must be positive, got {getattr(obj, key)}")


@dataclass
class MoEConfig:
    """Mixture-of-experts block (one per decoder layer unless listed in `dense_layers`)."""

    num_experts: int = 16
    """E: routed experts per layer."""
    top_k: int = 4
    """K: experts each token is sent to."""
    n_groups: int = 4
    """G: contiguous expert groups; each token takes top-(K/G) inside every group. 1 = plain top-K."""
    ffn_hidden: int = 64
    """Intermediate width of one SwiGLU expert (HF `moe_intermediate_size`)."""
    router_mode: str = "ste"
    """Router gradient: `sparse` (plain), `ste` (dense straight-through) or `ste_ema` (STE plus EMA
    expert outputs for non-selected experts, after "Default MoE"). Forward values are identical."""
    norm_topk_prob: bool = True
    """Renormalise the selected experts' probabilities to sum to 1 (HF `norm_topk_prob`)."""
    ema_decay: float = 0.99
    """Decay of the per-expert EMA output used by `ste_ema`."""
    aux_loss_coef: float = 1e-3
    """Global-batch load-balancing loss α·E/(K·T)·Σ c_i P_i (Qwen3-MoE's default 1e-3)."""
    seq_aux_loss_coef: float = 0.0
    """The same loss computed per sequence and averaged (DeepSeek-V3 style); off by default."""
    z_loss_coef: float = 0.0
    """Router z-loss α_z·mean(logsumexp(z))²; off by default (not in the public Intern-S1-Pro config)."""
    group_balance_coef: float = 1e-3
    """Group-level balance loss: the aux form inside each router group, averaged over groups."""
    bias_update_rate: float = 0.0
    """u of the aux-loss-free bias b_i ← b_i + u·sign(mean_load − load_i); 0 turns it off."""
    shared_expert_ffn: int = 0
    """Intermediate width of an always-on shared SwiGLU expert; 0 = none (Intern-S1-Pro has none)."""
    dense_layers: int = 0
    """Number of leading decoder layers that use a dense SwiGLU MLP instead of MoE."""
    dense_ffn_hidden: int = 0
    """Intermediate width of those dense MLPs (HF `intermediate_size`)."""

    def __post_init__(self) -> None:
        _require(self.num_experts > 0, "model.moe.num_experts", "must be positive")
        _require(self.ffn_hidden > 0, "model.moe.ffn_hidden", f"must be positive, got {self.ffn_hidden}")
        for key in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "group_balance_coef", "bias_update_rate"):
            _require(getattr(self, key) >= 0, f"model.moe.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("shared_expert_ffn", "dense_layers", "dense_ffn_hidden"):
            _require(getattr(self, key) >= 0, f"model.moe.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(0 < self.top_k <= self.num_experts, "model.moe.top_k",
                 f"must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        _require(self.n_groups > 0 and self.num_experts % self.n_groups == 0, "model.moe.n_groups",
                 f"num_experts ({self.num_experts}) must be divisible by n_groups ({self.n_groups})")
        _require(self.top_k % self.n_groups == 0, "model.moe.top_k",
                 f"top_k ({self.top_k}) must be divisible by n_groups ({self.n_groups})")
        _require(self.top_k // self.n_groups <= self.num_experts // self.n_groups, "model.moe.top_k",
                 "top_k / n_groups cannot exceed the experts in one group")
        _require(self.router_mode in ("sparse", "ste", "ste_ema"), "model.moe.router_mode",
                 f"must be sparse, ste or ste_ema, got '{self.router_mode}'")
        _require(0.0 <= self.ema_decay < 1.0, "model.moe.ema_decay", "must be in [0, 1)")
        _require(self.dense_layers == 0 or self.dense_ffn_hidden > 0, "model.moe.dense_ffn_hidden",
                 "must be set when dense_layers > 0")


@dataclass
class VisionModelConfig:
    """Vision encoder, the released Intern-S1-Pro tower (scimoe/model/vision.py); Intern-S1-Pro: hidden 1024,
    24 layers, 16 heads, mlp 4096, grid 48 (HF vision_config: hidden_size, depth, num_heads, intermediate_size,
    num_position_embeddings = grid²)."""

    enabled: bool = False
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 128
    grid: int = 48
    """Side of the learned position table (grid² rows), interpolated to each image's patch grid."""
    min_pixels: int = 32 * 32
    """Smaller images are scaled up to at least this many pixels (the release's processor: 65536)."""
    max_pixels: int = 1024 * 1024
    """Larger images are scaled down to at most this many pixels (the release's processor: 16777216)."""
    freeze: bool = False
    """Keep the encoder's weights fixed (no gradient, not in the optimizer)."""

    def __post_init__(self) -> None:
        _positive(self, "model.vision", ("hidden", "layers", "heads", "mlp", "grid", "min_pixels", "max_pixels"))
        _require(self.hidden % self.heads == 0, "model.vision.heads", f"must divide model.vision.hidden ({self.hidden})")
        _require(self.min_pixels <= self.max_pixels, "model.vision.min_pixels", "must not exceed model.vision.max_pixels")


@dataclass
class TimeSeriesModelConfig:
    """Time-series encoder, LMDeploy's Intern-S1-Pro tower (scimoe/model/timeseries.py): a per-patch encoder
    (`embed_*`, fixed at 128 wide, 8 heads, ffn 2048 in the release), a Whisper-style encoder (HF ts_config:
    d_model, encoder_layers, encoder_attention_heads, encoder_ffn_dim, num_mel_bins, max_source_positions,
    ts_adapt_out_dim) and a projector to the LM width."""

    enabled: bool = False
    embed_hidden: int = 32
    """Width of the per-patch encoder; pairs of patch vectors (2× this) enter the Whisper-style encoder."""
    embed_heads: int = 4
    embed_ffn: int = 64
    embed_layers: int = 1
    hidden: int = 64
    """d_model of the Whisper-style encoder."""
    layers: int = 2
    heads: int = 4
    ffn: int = 128
    mel_bins: int = 16
    """Channels the pairs of patch vectors are projected to before the convolutions (num_mel_bins: 80)."""
    max_source_positions: int = 1500
    """Learned positions of the Whisper-style encoder; frames beyond get none (as in the release)."""
    adapt_out: int = 64
    """Width after the Whisper-style encoder (ts_adapt_out_dim = ts_hidden_dim)."""
    activation: str = "gelu"
    """activation_function of the Whisper layers and the projector."""
    max_samples: int = 240_000
    """Longer series are cut to their first max_samples samples (LMDeploy's preprocessor does the same)."""
    chunk_elements: int = 1 << 23
    """Bound on the per-patch attention scores held at once (patches × heads × positions²), which sets how
    many patches are encoded together: ~32 MiB of fp32 scores whatever the signal length."""
    freeze: bool = False

    def __post_init__(self) -> None:
        _positive(self, "model.timeseries", ("embed_hidden", "embed_heads", "embed_ffn", "embed_layers", "hidden",
                                             "layers", "heads", "ffn", "mel_bins", "max_source_positions",
                                             "adapt_out", "max_samples", "chunk_elements"))
        _require(self.hidden % self.heads == 0, "model.timeseries.heads",
                 f"must divide model.timeseries.hidden ({self.hidden})")
        _require(self.embed_hidden % self.embed_heads == 0, "model.timeseries.embed_heads",
                 f"must divide model.timeseries.embed_hidden ({self.embed_hidden})")
        _require(self.activation in ("gelu", "relu", "silu", "gelu_pytorch_tanh"), "model.timeseries.activation",
                 f"must be gelu, relu, silu or gelu_pytorch_tanh, got '{self.activation}'")


@dataclass
class ModelConfig:
    """Decoder-only MoE language model (Intern-S1-Pro text tower), with optional vision and time-series encoders."""

    name: str = "tiny"
    """Preset name, for logs and run folders."""
    vocab_size: int = 384
    """Vocabulary size of embedding and LM head (the text tokenizer is trained to this size)."""
    hidden: int = 128
    """Model width d_model."""
    layers: int = 4
    """Decoder layers."""
    heads: int = 8
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (GQA); must divide `heads`."""
    head_dim: int = 16
    """Width of one attention head."""
    rms_eps: float = 1e-6
    """RMSNorm epsilon (all norms, including the per-head q/k norms)."""
    pos_emb: str = "fope"
    """Rotary variant: `fope` (Fourier position embedding, learned per-KV-head mixing) or `rope`."""
    rope_theta: float = 5e6
    """Rotary base θ."""
    max_positions: int = 4096
    """L_max: longest trained context; FoPE keeps only frequencies with ω > 2π/L_max."""
    fope_init_factor: float = 0.5
    """Gain of the xavier_normal_ perturbation that initialises the FoPE mixing matrices (I + noise), applied to
    the whole [kv_heads, D, D] tensor as the released code does."""
    fope_sep_head: bool = True
    """FoPE mixing matrices per KV head (True) or one shared pair (False)."""
    fope_trainable: bool = False
    """Train the FoPE mixing matrices. Off by default: the released Intern-S1-Pro keeps them as fixed buffers."""
    init_std: float = 0.02
    """Std of the normal init of linear, router and expert weights."""
    embed_init_std: float = 1.0
    """Std of the token-embedding init (1.0 with pre-norm blocks, as in modded-nanogpt; HF uses init_std)."""
    zero_init_output: bool = True
    """Zero-initialise the layers that write into the residual stream (o_proj, expert/MLP down_proj) and the
    LM head, so every block starts as the identity: measured 2× faster early loss drop on the tiny preset."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts settings."""
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)
    timeseries: TimeSeriesModelConfig = field(default_factory=TimeSeriesModelConfig)
    image_token_id: int = 3
    """Id of `<|image_pad|>` (scimoe's tokenizers reserve it): replaced by vision embeddings."""
    ts_token_id: int = 4
    """Id of `<|ts_pad|>`: replaced by time-series embeddings."""
    bos_token_id: int = 0
    """Beginning of text (`<|endoftext|>` in scimoe's tokenizers; 151643 in the released model's)."""
    eos_token_id: int = 2
    """End of a turn (`<|im_end|>`; 151645 in the released model's)."""
    video_token_id: int = -1
    """`<|video_pad|>`, kept for export (−1: none; 151656 in the released model's)."""
    vision_start_token_id: int = -1
    """`<|vision_start|>` (−1: none; 151652 in the released model's)."""
    vision_end_token_id: int = -1
    """`<|vision_end|>` (−1: none; 151653 in the released model's)."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "max_positions"):
            _require(getattr(self, key) > 0, f"model.{key}", "must be positive")
        _require(self.heads % self.kv_heads == 0, "model.kv_heads",
                 f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        _require(self.head_dim % 2 == 0, "model.head_dim", "must be even (rotary pairs)")
        _require(self.pos_emb in ("fope", "rope"), "model.pos_emb", f"must be fope or rope, got '{self.pos_emb}'")
        _require(self.moe.dense_layers <= self.layers, "model.moe.dense_layers", "exceeds model.layers")
        for key in ("rope_theta", "rms_eps", "init_std", "embed_init_std"):
            _require(getattr(self, key) > 0, f"model.{key}", f"must be > 0, got {getattr(self, key)}")
        _require(self.fope_init_factor >= 0, "model.fope_init_factor", "must be >= 0")
        for key in ("image_token_id", "ts_token_id"):
            _require(0 <= getattr(self, key) < self.vocab_size, f"model.{key}",
                     f"must be a token id below model.vocab_size ({self.vocab_size}), got {getattr(self, key)}")


@dataclass
class TrainConfig:
    """Optimisation and the step loop."""

    steps: int = 50
    """Total optimizer steps (also when resuming: the run stops at this step)."""
    seed: int = 1234
    """Seeds weights, data order and every RNG."""
    global_batch: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch: int = 4
    """Sequences per forward/backward on one rank; global_batch / (micro_batch·dp) = accumulation."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 1e-2
    """Peak learning rate."""
    min_lr: float = 1e-3
    """Learning rate at the end of the decay (and after it)."""
    warmup_steps: int = 5
    """Linear warm-up steps from 0 to `lr`."""
    schedule: str = "cosine"
    """After the warm-up: `cosine` or `linear` decay to min_lr over the schedule, `constant` at lr, or `wsd`
    (warm-up, stable at lr, then decay to min_lr over the last train.decay_fraction of the schedule)."""
    decay_steps: int = 0
    """The schedule's length in steps (0: train.steps of the run that started it). A resumed run keeps the length
    its checkpoint was trained with unless this is set, so continuing to more steps does not stretch the decay."""
    decay_fraction: float = 0.2
    """schedule=wsd: the share of the schedule spent decaying."""
    decay_shape: str = "linear"
    """schedule=wsd: the decay's shape, `linear`, `cosine` or `sqrt` (1 − √progress)."""
    lr_restart_from: str = ""
    """A checkpoint whose weights and optimizer state start a new run at step 0 with a new schedule (a finished
    run continued with, e.g., a WSD decay); ignored once this run has checkpoints of its own."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (norms, biases and FoPE matrices get none)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    dtype: str = "fp32"
    """`fp32`, or `bf16`: matrices stored and computed in bf16 under autocast; the router, FoPE tables and vectors
    stay fp32; fp32 master weights and AdamW moments sharded over data-parallel ranks with parallel.zero=1
    (scimoe/train/master.py); gradients accumulate and reduce in parallel.grad_reduce_dtype."""
    optimizer_offload: str = "none"
    """`none`, or `cpu`: fp32 master weights and AdamW moments live in host memory and DeepSpeed's CPU Adam steps
    them; only the (bf16 or fp32) weights and their gradient buffers stay on the device."""
    log_every: int = 1
    """Console line every N steps (metrics.jsonl gets every step)."""
    deterministic: bool = True
    """Use torch's deterministic kernels (warn-only where none exists). Needed for bit-exact resume: with
    2 CPU threads the default gather/scatter backward kernels differ run to run in the last bit."""
    max_minutes: float = 0.0
    """Save and exit cleanly once this much wall time has passed (0 = no limit); SIGTERM/SIGUSR1 do the same."""
    signal_grace_s: float = 300.0
    """After SIGTERM, a rank that has not saved and exited within this many seconds (blocked in a collective whose
    peer died, or a save too slow) prints where it is stuck and exits with code 143, without a checkpoint."""
    exit_after_steps: int = 0
    """Save and exit after this many steps in this process (Megatron's exit-interval, for job chains); 0 = off."""
    max_skipped_in_a_row: int = 10
    """Stop when this many consecutive steps had a non-finite loss or grad norm."""
    recompute: str = "none"
    """Activation recomputation: `none`, `selective` (the attention core and the experts' SwiGLU intermediates
    are computed again in the backward) or `full` (whole decoder layers); gradients are bitwise the same
    (scimoe/model/recompute.py)."""
    recompute_layers: Optional[list[int]] = None
    """Decoder layers (0-based, over the whole model) that `recompute` applies to; None = all."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "train.steps", "must be >= 0")
        _require(self.micro_batch > 0, "train.micro_batch", "must be positive")
        _require(self.global_batch > 0 and self.global_batch % self.micro_batch == 0, "train.global_batch",
                 f"must be a positive multiple of train.micro_batch ({self.micro_batch}), got {self.global_batch}")
        _require(self.seq_len > 1, "train.seq_len", "must be > 1")
        _require(self.dtype in ("fp32", "bf16"), "train.dtype", f"must be fp32 or bf16, got '{self.dtype}'")
        _require(self.lr > 0, "train.lr", "must be positive")
        _require(0 <= self.min_lr <= self.lr, "train.min_lr", "must be in [0, train.lr]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.schedule in ("cosine", "linear", "constant", "wsd"), "train.schedule",
                 f"must be cosine, linear, constant or wsd, got '{self.schedule}'")
        _require(self.decay_steps >= 0, "train.decay_steps", "must be >= 0 (0: train.steps)")
        _require(0 < self.decay_fraction <= 1, "train.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        _require(self.decay_shape in ("linear", "cosine", "sqrt"), "train.decay_shape",
                 f"must be linear, cosine or sqrt, got '{self.decay_shape}'")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _require(self.exit_after_steps >= 0, "train.exit_after_steps", "must be >= 0")
        _require(self.max_minutes >= 0, "train.max_minutes", "must be >= 0")
        _require(self.signal_grace_s > 0, "train.signal_grace_s", "must be positive")
        _require(self.max_skipped_in_a_row >= 1, "train.max_skipped_in_a_row", "must be >= 1")
        _require(self.seed >= 0, "train.seed", "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        for key in ("beta1", "beta2"):
            _require(0 <= getattr(self, key) < 1, f"train.{key}", f"must be in [0, 1), got {getattr(self, key)}")
        _require(self.eps > 0, "train.eps", "must be > 0")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _require(self.recompute in ("none", "selective", "full"), "train.recompute",
                 f"must be none, selective or full, got '{self.recompute}'")
        _require(self.optimizer_offload in ("none", "cpu"), "train.optimizer_offload",
                 f"must be none or cpu, got '{self.optimizer_offload}'")

    @property
    def mixed(self) -> bool:
        """Whether the optimizer steps separate fp32 masters (bf16 weights, or optimizer offload)."""
        return self.dtype == "bf16" or self.optimizer_offload != "none"


@dataclass
class DataConfig:
    """Where training tokens come from."""

    source: str = "text"
    """`text` (a plain-text corpus, one document per blank-line-separated paragraph), `synthetic`
    (sequences from a fixed random Markov chain: learnable, no files), `shards` (multimodal tar shards streamed
    from data.path, scimoe/data/stream.py), or an allow-listed dotted path to a function
    `(cfg, run_dir) -> PackedRows` (see scimoe/registry.py); the table is scimoe/data/sources.py."""
    path: Optional[str] = None
    """Text corpus file; None = the corpus bundled with the package."""
    tokenizer: Optional[str] = None
    """A `tokenizers` JSON file, or `hf:FOLDER` (a Hugging Face tokenizer folder, e.g. the released model's); None =
    train a byte-level BPE on the corpus (to model.vocab_size)."""
    trust_remote_code: bool = False
    """Let a `hf:` tokenizer folder run the Python code it ships (the released Intern-S1-Pro's does); refused
    otherwise, naming the file."""

    synthetic_rows: int = 512
    """Rows the synthetic source generates (one epoch)."""
    streaming: bool = False
    """Read multimodal records through HF datasets' streaming mode (no full copy in its cache); the decoded
    records are still all kept in memory: for data larger than host memory use data=shards (streamed tar
    shards, scimoe/data/stream.py)."""
    max_bad_fraction: float = 0.01
    """Stop when more than this share of multimodal records are bad (each one is reported by file:line; streamed
    shards: by shard and member, over the samples read so far, from 20 on)."""
    workers: int = 2
    """data.source=shards: processes decoding images and series (0: in the training process)."""
    prefetch: int = 16
    """data.source=shards: samples per source decoded ahead of the packer (bounds the loader's memory)."""
    blend: Optional[list[Any]] = None
    """Megatron-style weighted blend of pretokenized .bin/.idx prefixes: [w1, prefix1, w2, prefix2, …]
    (data.source=indexed), or of shard folders (data.source=shards: each row from one folder, drawn by weight)."""

    def __post_init__(self) -> None:
        _require(bool(self.source), "data.source", "must name a source")
        _require(self.workers >= 0, "data.workers", "must be >= 0")
        _require(self.prefetch >= 1, "data.prefetch", "must be >= 1")
        _require(self.synthetic_rows > 0, "data.synthetic_rows", "must be positive")
        _require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", "must be within [0, 1]")


@dataclass
class ParallelConfig:
    """Parallel layout; data parallel is whatever the world size leaves."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size."""
    etp: int = 1
    """Expert tensor-parallel size."""
    cp: int = 1
    """Context-parallel size: each row is cut into 2·cp chunks and every cp rank holds two of them (load-balanced
    for causal attention), attention gathers the row's keys and values (scimoe/model/context.py). Needs
    train.seq_len divisible by 2·cp (by 2·cp·tp with sequence parallelism)."""
    sequence_parallel: bool = False
    """With tp > 1, keep the residual stream, norms and MoE blocks on seq_len/tp positions per tp rank
    (activation memory ÷ tp); attention and the LM head gather the whole sequence."""
    pp_virtual: int = 1
    """Virtual pipeline stages (model chunks) per rank: > 1 runs megatron's interleaved 1F1B schedule."""
    pp_layers: Optional[list[int]] = None
    """Decoder layers per (virtual) pipeline stage, pp × pp_virtual entries (e.g. [3, 5]); None = even."""
    zero: int = 1
    """Optimizer-state sharding over data-parallel ranks: 0 = every rank keeps all AdamW state, 1 = ZeRO-1."""
    grad_bucket_mb: float = 64.0
    """Data-parallel gradients are summed in buckets of at most this many MiB (scimoe/parallel/grad_buckets.py)."""
    overlap_grad_reduce: bool = True
    """Start each bucket's data-parallel sum during the backward as soon as its gradients are final (bitwise the
    same result as after the backward)."""
    grad_reduce_dtype: str = "fp32"
    """With train.dtype=bf16: gradients accumulate over micro-batches and are summed over data-parallel ranks in
    `fp32` (megatron's accumulate_allreduce_grads_in_fp32) or `bf16` (half the buffer and traffic)."""
    collective_timeout_s: float = 600.0
    """Every process group's timeout: a collective that waits longer for a peer (a rank that died, or hangs) fails
    on this rank, which then exits non-zero instead of waiting forever. Keep it above the longest legitimate wait
    between two collectives (a synchronous checkpoint save, a first-use kernel build)."""

    def __post_init__(self) -> None:
        _require(self.grad_bucket_mb > 0, "parallel.grad_bucket_mb", "must be positive")
        _require(self.collective_timeout_s > 0, "parallel.collective_timeout_s", "must be positive")
        for key in ("tp", "pp", "ep", "etp", "cp"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "must be >= 1")
        _require(self.zero in (0, 1), "parallel.zero", f"must be 0 or 1, got {self.zero}")
        _require(self.grad_reduce_dtype in ("fp32", "bf16"), "parallel.grad_reduce_dtype",
                 f"must be fp32 or bf16, got '{self.grad_reduce_dtype}'")
        _require(self.pp_virtual >= 1, "parallel.pp_virtual", "must be >= 1")
        _require(self.pp_virtual == 1 or self.pp > 1, "parallel.pp_virtual", "needs parallel.pp > 1")


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    every: int = 0
    """Save every N optimizer steps (and at the last step); 0 = only at the end."""
    resume: str = "auto"
    """`auto` (the newest usable checkpoint in the run folder; a fresh start when there is none; an error listing
    them when checkpoints exist but none is usable), `auto_or_fresh` (the same, but start over from step 0
    rather than stop), `never`, or a checkpoint folder."""
    keep_last: int = 0
    """Keep only the newest N complete checkpoints; 0 keeps all."""
    async_save: bool = False
    """Write checkpoint files in a background thread while training goes on (needs host memory for one
    copy of this rank's model and optimizer state); the marker still comes last."""
    init_weights: str = ""
    """Start a fresh run (step 0, new optimizer) from the weights of this checkpoint folder, saved in any
    layout or made by `scimoe-import`; ignored when `resume` finds a checkpoint to continue."""

    on_save_error: str = "stop"
    """A save that fails (disk full, I/O error): `stop` the run (the error names the checkpoint) or `continue`
    training; either way the previous complete checkpoint stays the one resume uses."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "must be >= 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        _require(bool(self.resume), "checkpoint.resume", "must be auto, auto_or_fresh, never or a checkpoint folder")
        _require(self.on_save_error in ("stop", "continue"), "checkpoint.on_save_error",
                 f"must be stop or continue, got '{self.on_save_error}'")


@dataclass
class LoggerConfig:
    """Where per-step metrics go besides the console."""

    kind: str = "jsonl"
    """`jsonl` (DIR/metrics.jsonl), `wandb` (also metrics.jsonl) or `none`."""
    project: str = "scimoe"
    """wandb project."""
    mode: str = "offline"
    """wandb mode: offline (default, no network), online or disabled."""
    heatmap_every: int = 50
    """Log the layer × expert load heatmap to wandb as an image every N steps (0: never)."""

    def __post_init__(self) -> None:
        _require(self.kind in ("jsonl", "wandb", "none"), "logger.kind", f"must be jsonl, wandb or none, got '{self.kind}'")
        _require(self.mode in ("offline", "online", "disabled"), "logger.mode", f"bad wandb mode '{self.mode}'")
        _require(self.heatmap_every >= 0, "logger.heatmap_every", "must be >= 0")


@dataclass
class RecipeConfig:
    """Which training recipe runs."""

    name: str = "pretrain"
    """`pretrain` (next-token prediction on the data source), `sft` (the same loop on chat data, loss on
    assistant tokens; `recipe=sft` also sets data.source=sft) or `grpo` (RL with verifiable rewards)."""

    def __post_init__(self) -> None:
        _require(self.name in ("pretrain", "sft", "grpo"), "recipe.name", f"unknown recipe '{self.name}'")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on chat data (data.source=sft)."""

    thinking: bool = True
    """Render assistant turns with their <think> block (a record's own `thinking` key wins)."""
    truncation: str = "truncate"
    """A conversation longer than train.seq_len: `truncate` (keep its start) or `drop`; both counted."""
    chat_template: str = "scimoe"
    """Who renders conversations: `scimoe` (scimoe/data/chat.py: the released format, tested token for token against
    the released template) or `folder` (the chat template of a `data.tokenizer=hf:FOLDER`, through transformers;
    assistant turns are found by their ChatML markers for the loss mask)."""
    max_bad_fraction: float = 0.01
    """Stop when more than this share of the chat records cannot be read or rendered."""

    def __post_init__(self) -> None:
        _require(self.truncation in ("truncate", "drop"), "sft.truncation", f"must be truncate or drop, got '{self.truncation}'")
        _require(self.chat_template in ("scimoe", "folder"), "sft.chat_template",
                 f"must be scimoe or folder, got '{self.chat_template}'")
        _require(0 <= self.max_bad_fraction <= 1, "sft.max_bad_fraction", "must be within [0, 1]")


GPU_KINDS = ("h100", "h200", "a100", "b200", "cpu")


@dataclass
class ClusterConfig:
    """The machines: read by `scimoe-launch slurm`, `scimoe-plan` and the MFU metric."""

    gpu: str = "h100"
    """Accelerator kind (peak rates in scimoe/hardware.py): h100, h200, a100, b200 or cpu."""
    gpus: int = 8
    """Accelerators in the whole job (nodes × gpus_per_node)."""
    gpus_per_node: int = 8
    """Accelerators per node (one training process each)."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s per accelerator for MFU; 0 takes the table value of `gpu`."""
    partition: str = ""
    """Slurm partition (#SBATCH --partition); empty leaves the site default."""
    account: str = ""
    """Slurm account (#SBATCH --account); empty leaves the user's default."""
    time: str = "04:00:00"
    """Slurm time limit of one allocation; a preempted or timed-out job is requeued and resumes."""
    job_name: str = "scimoe"
    """Slurm job name."""
    signal_seconds: int = 120
    """Slurm sends SIGUSR1 this many seconds before the time limit (--signal=USR1@N): save and exit."""
    max_requeues: int = 20
    """How often the job script requeues itself after an unfinished allocation."""
    cpus_per_task: int = 64
    """CPU cores per node's task (torchrun and its workers)."""
    rdzv_port: int = 29500
    """c10d rendezvous port on the head node."""

    def __post_init__(self) -> None:
        _require(self.gpu in GPU_KINDS, "cluster.gpu", f"must be one of {', '.join(GPU_KINDS)}, got '{self.gpu}'")
        _require(self.gpus > 0 and self.gpus_per_node > 0, "cluster.gpus", "must be positive")
        _require(self.gpus % self.gpus_per_node == 0 or self.gpus < self.gpus_per_node, "cluster.gpus",
                 f"{self.gpus} is not a whole number of nodes of {self.gpus_per_node}")
        _require(self.peak_tflops >= 0, "cluster.peak_tflops", "must be >= 0")
        _require(self.signal_seconds >= 0, "cluster.signal_seconds", "must be >= 0")
        _require(self.max_requeues >= 0, "cluster.max_requeues", "must be >= 0")
        _require(self.cpus_per_task > 0, "cluster.cpus_per_task", "must be positive")
        _require(0 < self.rdzv_port < 65536, "cluster.rdzv_port", f"must be a port number, got {self.rdzv_port}")

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)


@dataclass
class GRPOConfig:
    """RL with verifiable rewards (recipe=grpo); the sampling defaults are Intern-S1-Pro's."""

    task: str = "addition"
    """Prompt source: `addition` (built-in toy: `a+b=` → the sum), `lookup` (built-in multi-turn tool toy: the
    answer is a secret that only the `lookup` tool knows; use grpo.max_turns ≥ 1) or `jsonl` (data.path records
    with `prompt` or `messages` and `answer`; data.tokenizer)."""
    addition_max: int = 4
    """The addition task's largest operand (sums stay single digits up to 4+4)."""
    prompts_per_step: int = 8
    """Prompts per optimizer step over all ranks."""
    group_size: int = 8
    """G: completions sampled per prompt (advantages are normalised within each group)."""
    max_new_tokens: int = 1
    """Longest completion; sampling also stops at EOS (the addition task answers in one token)."""
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 50
    kv_cache: bool = True
    """Sample with the KV cache (False re-runs the whole sequence per token: the benchmark baseline)."""
    rewards: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    """Reward functions (exact_match, think_format, tool_call_json or allow-listed dotted paths) → weights."""
    reward_errors: str = "zero"
    """A reward function that raises (a verifier bug): `zero` scores that part 0 and counts the sample in the
    step's `reward_errors` metric, `stop` stops the run naming the function. A step whose every reward failed
    stops the run either way."""
    scale_std: bool = True
    """Divide group-centred rewards by the group's std (False: only centre them, as Dr. GRPO does)."""
    std: str = "population"
    """Which std scales advantages: `population` (kept as the default: it is what earlier scimoe runs used) or
    `sample` (verl's and TRL's); they differ by the constant sqrt(G/(G−1)) for group size G."""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low."""
    clip_high: float = 0.28
    """ε_high: clipped above at 1 + ε_high (a higher ceiling keeps exploration: DAPO's clip-higher)."""
    clip_ratio_c: float = 0.0
    """Dual clip for negative advantages: the per-token loss is at most −c·A (c > 1, e.g. 3); 0 = off."""
    ratio_level: str = "token"
    """`token` (GRPO/PPO) or `sequence` (GSPO: one length-normalised ratio per sequence, clipped per sequence;
    use much smaller clip ranges, e.g. clip_low=3e-4 clip_high=4e-4)."""
    tis_cap: float = 2.0
    """With old_logprobs=rollout: ratios are taken against the trainer's recomputed log-probs and each token's
    loss is weighted by min(π_old / π_rollout, tis_cap) (truncated importance sampling), correcting for a
    sampler that differs from the trainer; 0 uses the rollout log-probs as the old policy, uncorrected."""
    kl_coef: float = 0.0
    """β of the KL penalty to the frozen starting policy (0: no reference model)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (see scimoe/rl/loss.py)."""
    aggregation: str = "token_mean"
    """token_mean (over all completion tokens), seq_mean (per sequence, then over sequences) or constant_length
    (Dr. GRPO: the token sum / (sequences × grpo.max_new_tokens))."""
    old_logprobs: str = "recompute"
    """recompute (a no-grad forward of the policy before the update) or rollout (stored while sampling)."""
    router_replay: bool = True
    """Force the experts chosen during rollout in the training forward; metrics report the mismatch."""
    max_turns: int = 0
    """Tool calls a trajectory may make (multi-turn rollouts, scimoe/rl/tools.py); 0 = single turn, no tools."""
    tools: dict[str, str] = field(default_factory=dict)
    """Tools a rollout may call: name → `calculator` or an allow-listed dotted path of a Python function taking
    the call's arguments as keywords (the task may bring its own, e.g. `lookup`)."""
    tool_timeout_s: float = 2.0
    """A tool running longer than this answers `error: … took longer than …` (0: no limit)."""

    def __post_init__(self) -> None:
        _require(self.task in ("addition", "lookup", "jsonl"), "grpo.task",
                 f"must be addition, lookup or jsonl, got '{self.task}'")
        _require(self.max_turns >= 0, "grpo.max_turns", "must be >= 0")
        _require(self.tool_timeout_s >= 0, "grpo.tool_timeout_s", "must be >= 0")
        _require(self.group_size >= 2, "grpo.group_size", "must be >= 2 (advantages compare completions)")
        _require(self.prompts_per_step >= 1 and self.max_new_tokens >= 1, "grpo.prompts_per_step", "must be positive")
        _require(self.temperature > 0, "grpo.temperature", "must be > 0")
        _require(self.addition_max >= 0, "grpo.addition_max", "must be >= 0")
        _require(self.top_k >= 0, "grpo.top_k", "must be >= 0 (0: no top-k filter)")
        _require(0 <= self.clip_low < 1, "grpo.clip_low", f"must be in [0, 1), got {self.clip_low}")
        _require(self.clip_high >= 0, "grpo.clip_high", "must be >= 0")
        _require(self.kl_coef >= 0, "grpo.kl_coef", "must be >= 0")
        _require(self.reward_errors in ("zero", "stop"), "grpo.reward_errors",
                 f"must be zero or stop, got '{self.reward_errors}'")
        for name, weight in self.rewards.items():
            _require(math.isfinite(weight), f"grpo.rewards.{name}", f"must be a finite weight, got {weight}")
        _require(0 < self.top_p <= 1, "grpo.top_p", "must be in (0, 1]")
        _require(self.kl_estimator in ("k1", "k2", "k3"), "grpo.kl_estimator", f"unknown '{self.kl_estimator}'")
        _require(self.aggregation in ("token_mean", "seq_mean", "constant_length"), "grpo.aggregation",
                 f"unknown '{self.aggregation}'")
        _require(self.std in ("population", "sample"), "grpo.std", f"must be population or sample, got '{self.std}'")
        _require(self.clip_ratio_c == 0 or self.clip_ratio_c > 1, "grpo.clip_ratio_c", "must be 0 (off) or > 1")
        _require(self.ratio_level in ("token", "sequence"), "grpo.ratio_level", f"unknown '{self.ratio_level}'")
        _require(self.tis_cap >= 0, "grpo.tis_cap", "must be >= 0")
        _require(self.old_logprobs in ("recompute", "rollout"), "grpo.old_logprobs", f"unknown '{self.old_logprobs}'")


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def __post_init__(self) -> None:
        _require(self.train.seq_len <= self.model.max_positions, "train.seq_len",
                 f"exceeds model.max_positions ({self.model.max_positions})")
        missing = [i for i in self.train.recompute_layers or [] if not 0 <= i < self.model.layers]
        _require(not missing, "train.recompute_layers",
                 f"names layers {missing} that do not exist (model.layers = {self.model.layers}: 0 … {self.model.layers - 1})")
        _require(self.train.recompute != "none" or not self.train.recompute_layers, "train.recompute_layers",
                 "is set but train.recompute is none")
        _require(self.parallel.grad_reduce_dtype == "fp32" or self.train.dtype == "bf16", "parallel.grad_reduce_dtype",
                 "bf16 needs train.dtype=bf16 (fp32 weights keep fp32 gradients)")


def register_configs() -> None:
    """Register the schema so `config.yaml`'s defaults list can extend it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="scimoe_schema", node=Config)


def validate(cfg: "DictConfig | Config") -> Config:
    """Turn a composed config into dataclasses, running every `__post_init__` check."""
    if isinstance(cfg, Config):
        return cfg
    from omegaconf import OmegaConf

    _refuse_unknown_keys(cfg, Config, "")
    obj: Any = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        raise TypeError("the composed config is not a scimoe Config (did config.yaml lose its schema?)")
    return obj


def _refuse_unknown_keys(node, schema: type, prefix: str) -> None:
    """Keys the schema does not declare (Hydra's `+key=value` adds them even to a structured config)."""
    import dataclasses
    import difflib
    import typing

    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; {prefix.rstrip('.') or 'the config'} has " \
                f"{', '.join(known)}"
            raise ConfigError(f"config error at '{prefix}{key}': unknown key{hint}")
        inner = hints.get(key)
        if dataclasses.is_dataclass(inner) and node[key] is not None:
            _refuse_unknown_keys(node[key], inner, f"{prefix}{key}.")


def compose_config(overrides: list[str]) -> Config:
    """The validated Config that `scimoe-train OVERRIDES` would run with (Hydra's compose API; `hydra.*`
    overrides are dropped): for tools and tests that read the same configs without starting a run."""
    from hydra import compose, initialize_config_module

    from scimoe.run_dir import register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_module("scimoe.configs", version_base=None):
        return validate(compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")]))
