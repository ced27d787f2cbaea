"""Per-rank memory of a layout, from the config alone: what scimoe's training allocates, term by term.

Tested by `python -m pytest tests/plan` against what running jobs allocate (parameters, gradients and
AdamW state exactly; activations against the bytes autograd saves, within 10%, fp32 and bf16). Conventions, from the
implementation (docs/planning.md explains each):
- fp32 (`train.dtype=fp32`, no offload): weights, gradients and AdamW moments are fp32, 4 + 4 + 8 bytes per
  parameter; torch's ZeRO-1 shards the moments of dense weights over dp and of experts over expert-dp.
- mixed precision (`train.dtype=bf16` and/or `train.optimizer_offload=cpu`, scimoe/train/master.py): matrices
  2 bytes in bf16 (router, FoPE tables and vectors stay 4), the gradient buffer 4 or 2
  (`parallel.grad_reduce_dtype`), and per owned parameter an fp32 master and two moments, 12 bytes + a 4-byte
  step, dealt out whole (largest first to the least loaded rank) over dp / expert-dp with `parallel.zero=1`.
  Offload moves those to host memory (`host_bytes`, with a 4-byte fp32 copy of each owned gradient).
- tensor parallelism splits q/k/v/o, the embedding, the LM head and per-KV-head FoPE tables; norms,
  routers, experts and dense MLPs are whole on every tp rank; expert parallelism splits the experts.
- stage s of pp holds its layers (first: embedding; last: final norm and LM head; FoPE on every stage).
- activations: per token and layer, the tensors autograd keeps for the backward (counted from the code:
  attention 3H+1 + 4·n_q·d + 4·n_kv·d + 2·n_q + n_kv elements, MoE 3H+1 + 2E + 10K + 3K·H + 4K·F, dense
  MLP 3H+1 + 4F'; the rotary tables once per stage); the LM head adds 3H+3 + V/tp per token. Under bf16 each
  term is split: what the norms, q/k norms, router, softmax statistics, rotary tables, logits and integer
  indices keep is fp32 (4 bytes; ids count as 2 elements), the rest (projection inputs, q/k/v, the experts'
  rows and SwiGLU intermediates, the residual stream) 2 bytes. 1F1B keeps up to pp micro-batches in flight on
  stage 0.
- recomputation (`train.recompute`): `selective` drops the experts' SwiGLU intermediates (4K·F/etp: the
  gate/up output, silu(gate) and the product) and the attention core's softmax statistics (n_q) from each
  layer; `full` keeps only each layer's input (H per position held) and the rotary tables. While the backward recomputes, one block's activations exist again at a time
  (`recompute_transient_bytes`: a whole layer for `full`, one expert block's SwiGLU for `selective`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scimoe.config import Config
from scimoe.model.rotary import kept_frequency_count
from scimoe.parallel.dims import ParallelDims
from scimoe.parallel.pipeline import stage_layers

GIB = 2**30


@dataclass
class StageMemory:
    """One pipeline stage's per-rank bytes (the fullest rank of the stage for the ZeRO shards)."""

    stage: int
    layers: range
    dense_params: int = 0
    """Parameters reduced over dp (everything but expert weights when ep > 1)."""
    expert_params: int = 0
    """Expert weights sharded over ep (reduced over expert-dp)."""
    params_bytes: int = 0
    grads_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes_per_microbatch: int = 0
    """What autograd keeps per micro-batch for the backward, under the config's train.recompute."""
    recompute_transient_bytes: int = 0
    """Activations one recomputed block rebuilds during the backward (0 without recomputation)."""
    microbatches_in_flight: int = 1
    alltoall_buffer_bytes: int = 0
    step_transient_bytes: int = 0
    """What the optimizer step allocates for a moment (the fullest rank): torch's foreach AdamW makes an fp32
    temporary per owned element, bf16 buckets an fp32 copy of the owned gradients, and each owner's
    broadcast a flat copy of its updated weights. Activations are gone by then, so the peak is the larger."""
    optimizer_bytes_per_rank: list[int] = field(default_factory=list)
    """Optimizer bytes on the device of each rank of the stage, in global rank order (AdamW moments, plus the
    fp32 masters under mixed precision; ZeRO-1 shards whole tensors, unevenly; 0 under offload)."""
    host_bytes_per_rank: list[int] = field(default_factory=list)
    """Host memory each rank's offloaded optimizer holds (masters, moments, gradient copies); 0 without offload."""
    host_resident_bytes_per_rank: list[int] = field(default_factory=list)
    """The part of host_bytes_per_rank that stays between steps (masters and moments)."""

    def total(self) -> int:
        """The fullest rank's peak bytes on the device."""
        return self.total_on_rank(self.optimizer_bytes_per_rank.index(self.optimizer_bytes)
                                  if self.optimizer_bytes_per_rank else 0)

    def total_on_rank(self, r: int) -> int:
        """Peak device bytes of the stage's rank `r` (its place in the stage, global rank order): the state, plus
        the larger of the backward's activations and the optimizer step's temporaries."""
        backward = (self.activation_bytes_per_microbatch * self.microbatches_in_flight + self.recompute_transient_bytes
                    + self.alltoall_buffer_bytes)
        optimizer = self.optimizer_bytes_per_rank[r] if self.optimizer_bytes_per_rank else self.optimizer_bytes
        return self.params_bytes + self.grads_bytes + optimizer + max(backward, self.step_transient_bytes)


@dataclass
class MemoryPlan:
    stages: list[StageMemory] = field(default_factory=list)

    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total())


def layer_parameters(cfg: Config, moe_layer: bool) -> tuple[list[tuple[int, bool]], list[tuple[int, bool]]]:
    """One decoder layer's parameters on one rank as (numel, weight-decayed) in model order:
    (reduced over dp, sharded over ep)."""
    m, tp, ep = cfg.model, cfg.parallel.tp, cfg.parallel.ep
    h, d = m.hidden, m.head_dim
    dense = [(h, False),  # input norm
             (m.heads * d * h // tp, True), (m.kv_heads * d * h // tp, True), (m.kv_heads * d * h // tp, True),
             (h * m.heads * d // tp, True), (d, False), (d, False),  # q k v o, q/k norms
             (h, False)]  # post-attention norm
    if not moe_layer:
        return dense + [(h * m.moe.dense_ffn_hidden, True)] * 3, []
    dense.append((m.moe.num_experts * h, True))  # router
    local, etp = m.moe.num_experts // ep, cfg.parallel.etp  # etp splits each expert's hidden width
    experts = [(local * 2 * m.moe.ffn_hidden * h // etp, True), (local * h * m.moe.ffn_hidden // etp, True)]
    shared = [(h * m.moe.shared_expert_ffn, True)] * 3 if m.moe.shared_expert_ffn else []
    return (dense + shared, experts) if ep > 1 else (dense + experts + shared, [])  # ep=1: experts reduce over dp


def zero_adam_bytes(params: list[tuple[int, bool]], ranks: int, per_element: int = 8, per_tensor: int = 4) -> list[int]:
    """AdamW bytes (exp_avg, exp_avg_sq, fp32 step) each of `ranks` ranks holds under torch's
    ZeroRedundancyOptimizer: decayed parameters first, then the others, each group largest first to the
    least loaded rank (its algorithm; ranks=1: everything). per_element=1, per_tensor=0: the elements owned."""
    sizes, adam = [0] * ranks, [0] * ranks
    for decay in (True, False):
        for numel in sorted((n for n, dec in params if dec == decay), reverse=True):
            chosen = sizes.index(min(sizes))
            sizes[chosen] += numel
            adam[chosen] += per_element * numel + per_tensor
    return adam


def master_bytes(params: list[tuple[int, bool]], ranks: int, per_element: int, per_tensor: int = 4) -> list[int]:
    """Bytes each of `ranks` ranks holds for the parameters it owns under scimoe/train/master.py's partition
    (every parameter, largest first, to the least loaded rank): `per_element` per element + a 4-byte step."""
    load, held = [0] * ranks, [0] * ranks
    for numel in sorted((n for n, _ in params), reverse=True):
        chosen = load.index(min(load))
        load[chosen] += numel
        held[chosen] += per_element * numel + per_tensor
    return held


def layout(cfg: Config, world_size: int | None = None) -> ParallelDims:
    """The layout `cfg.parallel` describes on `world_size` ranks (default: the smallest world it fits), whose
    properties hold every share and group size the plan uses."""
    p = cfg.parallel
    return ParallelDims.from_config(p, world_size or p.tp * p.pp * p.cp * p.ep * p.etp, 0)


def _shares(cfg: Config) -> tuple[float, float]:
    """(positions this rank holds outside attention, share of the tokens its expert block routes) per token of
    the micro-batch (ParallelDims.held_fraction, routed_fraction)."""
    dims = layout(cfg)
    return dims.held_fraction, dims.routed_fraction


def swiglu_elements_per_token(cfg: Config) -> float:
    """The experts' SwiGLU intermediates of one MoE layer per token: what selective recomputation frees."""
    m = cfg.model
    return 4 * m.moe.top_k * m.moe.ffn_hidden / cfg.parallel.etp * _shares(cfg)[1]


def activation_split(cfg: Config, moe_layer: bool, mode: str | None = None) -> tuple[float, float]:
    """(fp32 elements, compute-dtype elements) autograd saves per token in one layer on one rank under
    recomputation `mode` (default: train.recompute; see the module docstring). Under fp32 both are 4 bytes."""
    m, tp = cfg.model, cfg.parallel.tp
    mode = mode or cfg.train.recompute
    h, d = m.hidden, m.head_dim
    share, routed_share = _shares(cfg)
    if mode == "full":
        return 0.0, h * share
    q, kv = m.heads // tp, m.kv_heads // tp
    # fp32: the norm's input and normalised input and statistic (held positions), q/k norms' (input, output,
    # statistic), the core's softmax statistics (freed by selective recompute); compute dtype: the norm's
    # gathered output (the projections' input), q and k rotated, v
    fp32 = (2 * h + 1) * share + 2 * q * d + 2 * kv * d + q + kv + (0 if mode == "selective" else q)
    compute = h + 2 * q * d + 2 * kv * d
    if cfg.parallel.cp > 1 and mode != "selective":  # the row's keys and values, gathered over cp: cp per held token
        compute += 2 * kv * d * cfg.parallel.cp
    if not moe_layer:
        return fp32 + (2 * h + 1) * share, compute + (h + 4 * m.moe.dense_ffn_hidden) * share
    k = m.moe.top_k
    router = 2 * m.moe.num_experts + 10 * k  # probabilities, logits, weights, indices
    if layout(cfg).moe_gathers_sequence:  # the block gathers the sequence: every position
        fp32 += 2 * h * share + 1 + h + router
        compute += h * share + 2 * h + 4 * m.moe.shared_expert_ffn + 3 * k * h
    else:  # the post-attention norm and the router's fp32 input; the experts' rows in and out
        fp32 += (3 * h + 1) * share + router * routed_share
        compute += 4 * m.moe.shared_expert_ffn * share + 3 * k * h * routed_share
    if cfg.parallel.ep > 1:  # the expert outputs put back in received order for the return all-to-all; one more index
        fp32 += 2 * k * routed_share
        compute += k * h * routed_share
    return fp32, compute + (0 if mode == "selective" else swiglu_elements_per_token(cfg))


def activation_elements_per_token(cfg: Config, moe_layer: bool, mode: str | None = None) -> float:
    """All elements autograd saves per token in one layer on one rank (`activation_split` summed)."""
    return sum(activation_split(cfg, moe_layer, mode))


def rotary_elements_per_token(cfg: Config) -> int:
    """The (cos, sin) tables of one token: per KV head (this rank's) for FoPE with separate heads, else shared."""
    m = cfg.model
    heads = m.kv_heads // cfg.parallel.tp if m.pos_emb == "fope" and m.fope_sep_head else 1
    return 2 * heads * m.head_dim


def layer_recompute(cfg: Config, layer: int) -> str:
    """The recomputation mode of decoder `layer` (train.recompute where train.recompute_layers includes it)."""
    chosen = cfg.train.recompute_layers
    return cfg.train.recompute if chosen is None or layer in chosen else "none"


def plan_memory(cfg: Config, world_size: int) -> MemoryPlan:
    """Per-rank bytes of every pipeline stage of `cfg`'s layout on `world_size` ranks."""
    m, par, train = cfg.model, cfg.parallel, cfg.train
    dims = layout(cfg, world_size)
    tp, pp, ep, etp, dp, expert_dp = dims.tp, dims.pp, dims.ep, dims.etp, dims.dp, dims.expert_dp
    stages = pp * par.pp_virtual
    tokens = train.micro_batch * train.seq_len // dims.cp  # context parallelism: this rank's chunks of each row
    compute_bytes = 4 if train.dtype == "fp32" else 2
    mixed = train.dtype == "bf16" or train.optimizer_offload != "none"
    offload = train.optimizer_offload != "none"
    tables = m.kv_heads if m.fope_sep_head else 1
    fope = 2 * tables * kept_frequency_count(m.head_dim, m.rope_theta, m.max_positions) ** 2 \
        if m.pos_emb == "fope" and m.fope_trainable else 0  # buffers (as released) have no grads or AdamW state
    fope = fope // tp if tables > 1 and tp > 1 else fope
    plan = MemoryPlan()
    for rank in range(pp):
        layer_ids = [i for c in range(par.pp_virtual) for i in stage_layers(m.layers, stages, c * pp + rank, par.pp_layers)]
        s = StageMemory(stage=rank, layers=range(min(layer_ids), max(layer_ids) + 1))
        dense: list[tuple[int, bool]] = [(m.vocab_size * m.hidden // tp, True)] if rank == 0 else []
        dense += [(fope // 2, False)] * 2 if fope else []
        experts: list[tuple[int, bool]] = []
        fp32_act, compute_act = (2.0 if rank == 0 else 0.0), 0.0  # token ids (int64)
        routers = 0
        for i in layer_ids:
            moe_layer = i >= m.moe.dense_layers
            layer_dense, layer_experts = layer_parameters(cfg, moe_layer)
            dense += layer_dense
            experts += layer_experts
            routers += m.moe.num_experts * m.hidden if moe_layer else 0
            f, c = activation_split(cfg, moe_layer, layer_recompute(cfg, i))
            fp32_act, compute_act = fp32_act + f, compute_act + c
        if rank == pp - 1:
            dense += [(m.hidden, False), (m.vocab_size * m.hidden // tp, True)]
            held = dims.held_fraction
            fp32_act += (2 * m.hidden + 1) * held + 2 + m.vocab_size // tp  # final norm, labels, fp32 logits
            compute_act += m.hidden * held  # the head's input
        s.dense_params, s.expert_params = sum(n for n, _ in dense), sum(n for n, _ in experts)
        total = s.dense_params + s.expert_params
        kept = sum(n for n, decayed in dense + experts if not decayed) + routers  # stay fp32 under bf16
        s.params_bytes = 4 * total if train.dtype == "fp32" else 2 * (total - kept) + 4 * kept
        s.grads_bytes = (2 if mixed and par.grad_reduce_dtype == "bf16" else 4) * total
        if mixed:
            dense_opt = master_bytes(dense, dp if par.zero else 1, 12)
            expert_opt = master_bytes(experts, expert_dp if par.zero else 1, 12)
        else:
            dense_opt = zero_adam_bytes(dense, dp if par.zero else 1)
            expert_opt = zero_adam_bytes(experts, expert_dp if par.zero else 1)
        # megatron's rank order: tp fastest (dp rank r // tp); etp, ep, then expert-dp (rank r // (etp·ep))
        per_rank = [dense_opt[r // tp if par.zero else 0] + expert_opt[r // (ep * etp) if par.zero else 0]
                    for r in range(tp * dp)]
        dense_ranks, expert_ranks = (dp if par.zero else 1), (expert_dp if par.zero else 1)
        owning = master_bytes if mixed else zero_adam_bytes
        dense_owned, expert_owned = owning(dense, dense_ranks, 1, 0), owning(experts, expert_ranks, 1, 0)
        owned = max(dense_owned[r // tp if par.zero else 0] + expert_owned[r // (ep * etp) if par.zero else 0]
                    for r in range(tp * dp))
        if not offload:
            weight_bytes = 2 if train.dtype == "bf16" else 4
            s.step_transient_bytes = 4 * owned + (4 * owned if mixed and par.grad_reduce_dtype == "bf16" else 0) \
                + (weight_bytes * owned if mixed and max(dense_ranks, expert_ranks) > 1 else 0)
        if offload:  # on the host, with an fp32 copy of each owned gradient: 16 bytes per element
            dense_host = master_bytes(dense, dp if par.zero else 1, 16)
            expert_host = master_bytes(experts, expert_dp if par.zero else 1, 16)
            s.host_bytes_per_rank = [dense_host[r // tp if par.zero else 0] +
                                     expert_host[r // (ep * etp) if par.zero else 0] for r in range(tp * dp)]
            s.host_resident_bytes_per_rank = per_rank  # masters and moments, without the step's gradient copies
            per_rank = [0] * len(per_rank)
        s.optimizer_bytes_per_rank = per_rank
        s.optimizer_bytes = max(s.optimizer_bytes_per_rank)
        recomputed = [i for i in layer_ids if layer_recompute(cfg, i) != "none"]
        # computed once per stage, read by every layer; FoPE's tables come out of a matmul (compute dtype)
        if m.pos_emb == "fope":
            compute_act += rotary_elements_per_token(cfg)
        else:
            fp32_act += rotary_elements_per_token(cfg)
        s.activation_bytes_per_microbatch = int((4 * fp32_act + compute_bytes * compute_act) * tokens)
        rebuilt = 0.0
        if train.recompute == "full" and recomputed:
            rebuilt = max(4 * f + compute_bytes * c for f, c in
                          (activation_split(cfg, i >= m.moe.dense_layers, "none") for i in recomputed))
        elif train.recompute == "selective" and any(i >= m.moe.dense_layers for i in recomputed):
            rebuilt = compute_bytes * swiglu_elements_per_token(cfg)
        s.recompute_transient_bytes = int(rebuilt * tokens)
        s.microbatches_in_flight = min(pp - rank, max(1, train.global_batch // (train.micro_batch * dims.data_parallel)))
        if ep > 1:  # dispatch send + receive buffers of one MoE layer: tokens·K rows of H each way
            s.alltoall_buffer_bytes = int(2 * tokens * m.moe.top_k * m.hidden * compute_bytes)
        plan.stages.append(s)
    return plan
