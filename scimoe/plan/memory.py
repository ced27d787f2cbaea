"""Per-rank memory of a layout, from the config alone: what scimoe's training allocates, term by term.

Tested by `python -m pytest tests/plan` against what running jobs allocate (parameters, gradients and
AdamW state exactly; activations against the bytes autograd saves, within 20%). Conventions, from the
implementation (docs/planning.md explains each):
- weights, gradients and AdamW moments are fp32 (bf16 is autocast only): 4 + 4 + 8 bytes per parameter;
  ZeRO-1 shards the moments of dense weights over dp and of experts over expert-dp (`parallel.zero=1`).
- tensor parallelism splits q/k/v/o, the embedding, the LM head and per-KV-head FoPE tables; norms,
  routers, experts and dense MLPs are whole on every tp rank; expert parallelism splits the experts.
- stage s of pp holds its layers (first: embedding; last: final norm and LM head; FoPE on every stage).
- activations: per token and layer, the tensors autograd keeps for the backward (counted from the code:
  attention 3H+1 + 4·n_q·d + 4·n_kv·d + 2·n_q + n_kv elements, MoE 3H+1 + 2E + 10K + 3K·H + 4K·F, dense
  MLP 3H+1 + 4F'; the rotary tables once per stage), times 4 bytes (fp32) or ~2.5 (bf16 autocast keeps norms and the router in fp32); the
  LM head adds 3H+3 + V/tp per token. 1F1B keeps up to pp micro-batches in flight on stage 0.
- recomputation (`train.recompute`): `selective` drops the experts' SwiGLU intermediates (4K·F/etp: the
  gate/up output, silu(gate) and the product) and the attention core's softmax statistics (n_q) from each
  layer; `full` keeps only each layer's input (H per position held) and the rotary tables. While the backward recomputes, one block's activations exist again at a time
  (`recompute_transient_bytes`: a whole layer for `full`, one expert block's SwiGLU for `selective`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scimoe.config import Config
from scimoe.model.rotary import kept_frequency_count
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
    optimizer_bytes_per_rank: list[int] = field(default_factory=list)
    """AdamW bytes on each rank of the stage, in global rank order (ZeRO-1 shards whole tensors, unevenly)."""

    def total(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activation_bytes_per_microbatch * self.microbatches_in_flight + self.recompute_transient_bytes
                + self.alltoall_buffer_bytes)


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


def zero_adam_bytes(params: list[tuple[int, bool]], ranks: int) -> list[int]:
    """AdamW bytes (exp_avg, exp_avg_sq, fp32 step) each of `ranks` ranks holds under torch's
    ZeroRedundancyOptimizer: decayed parameters first, then the others, each group largest first to the
    least loaded rank (its algorithm; ranks=1: everything)."""
    sizes, adam = [0] * ranks, [0] * ranks
    for decay in (True, False):
        for numel in sorted((n for n, dec in params if dec == decay), reverse=True):
            chosen = sizes.index(min(sizes))
            sizes[chosen] += numel
            adam[chosen] += 8 * numel + 4
    return adam


def _shares(cfg: Config) -> tuple[float, float]:
    """(positions this rank holds outside attention, share of the tokens its expert block routes) per token of
    the micro-batch: sequence parallelism keeps 1/tp of the positions; with tp × ep (no SP) each tp rank routes
    its 1/tp share (megatron's layout); SP with etp gathers the whole sequence into the block."""
    par = cfg.parallel
    share = 1 / par.tp if par.sequence_parallel else 1.0
    if par.sequence_parallel and par.etp > 1:
        return share, 1.0
    return share, 1 / par.tp if par.ep > 1 and par.etp == 1 and not par.sequence_parallel else share


def swiglu_elements_per_token(cfg: Config) -> float:
    """The experts' SwiGLU intermediates of one MoE layer per token: what selective recomputation frees."""
    m = cfg.model
    return 4 * m.moe.top_k * m.moe.ffn_hidden / cfg.parallel.etp * _shares(cfg)[1]


def activation_elements_per_token(cfg: Config, moe_layer: bool, mode: str | None = None) -> float:
    """Elements autograd saves per token in one layer on one rank under recomputation `mode` (default:
    train.recompute; see the module docstring)."""
    m, tp = cfg.model, cfg.parallel.tp
    mode = mode or cfg.train.recompute
    h, d = m.hidden, m.head_dim
    share, routed_share = _shares(cfg)
    if mode == "full":
        return h * share
    q, kv = m.heads // tp, m.kv_heads // tp
    # the norm's input, statistic and normalised input (held positions), its gathered output, q/k before and after
    # their norms and rotation, v, the core's output and softmax statistics (the last freed by selective recompute)
    attention = (2 * h + 1) * share + h + 4 * q * d + 4 * kv * d + 2 * q + kv - (q if mode == "selective" else 0)
    if not moe_layer:
        return attention + (3 * h + 1 + 4 * m.moe.dense_ffn_hidden) * share
    k = m.moe.top_k
    routed = 2 * m.moe.num_experts + 10 * k + 3 * k * h
    if cfg.parallel.sequence_parallel and cfg.parallel.etp > 1:  # the block gathers the sequence: every position
        block = 3 * h * share + 1 + 3 * h + 4 * m.moe.shared_expert_ffn + routed
    else:
        block = (3 * h + 1 + 4 * m.moe.shared_expert_ffn) * share + routed * routed_share
    return attention + block + (0 if mode == "selective" else swiglu_elements_per_token(cfg))


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
    tp, pp, ep = par.tp, par.pp, par.ep
    dp = world_size // (tp * pp)
    etp = par.etp
    expert_dp = max(1, tp * dp // (ep * etp))  # megatron's expert groups span tp: tp·dp = etp·ep·expert-dp
    stages = pp * par.pp_virtual
    tokens = train.micro_batch * train.seq_len
    act_bytes = 4.0 if train.dtype == "fp32" else 2.5
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
        act = 2 if rank == 0 else 0  # token ids (int64)
        for i in layer_ids:
            moe_layer = i >= m.moe.dense_layers
            layer_dense, layer_experts = layer_parameters(cfg, moe_layer)
            dense += layer_dense
            experts += layer_experts
            act += activation_elements_per_token(cfg, moe_layer, layer_recompute(cfg, i))
        if rank == pp - 1:
            dense += [(m.hidden, False), (m.vocab_size * m.hidden // tp, True)]
            act += (3 * m.hidden + 1) * (1 / tp if par.sequence_parallel else 1) + 2 + m.vocab_size // tp
        s.dense_params, s.expert_params = sum(n for n, _ in dense), sum(n for n, _ in experts)
        s.params_bytes = s.grads_bytes = 4 * (s.dense_params + s.expert_params)
        dense_adam = zero_adam_bytes(dense, dp if par.zero else 1)
        expert_adam = zero_adam_bytes(experts, expert_dp if par.zero else 1)
        # megatron's rank order: tp fastest (dp rank r // tp); etp, ep, then expert-dp (rank r // (etp·ep))
        s.optimizer_bytes_per_rank = [dense_adam[r // tp if par.zero else 0] +
                                      expert_adam[r // (ep * etp) if par.zero else 0] for r in range(tp * dp)]
        s.optimizer_bytes = max(s.optimizer_bytes_per_rank)
        recomputed = [i for i in layer_ids if layer_recompute(cfg, i) != "none"]
        act += rotary_elements_per_token(cfg)  # computed once per stage, read by every layer
        s.activation_bytes_per_microbatch = int(act * tokens * act_bytes)
        rebuilt = 0.0
        if train.recompute == "full" and recomputed:
            rebuilt = max(activation_elements_per_token(cfg, i >= m.moe.dense_layers, "none") for i in recomputed)
        elif train.recompute == "selective" and any(i >= m.moe.dense_layers for i in recomputed):
            rebuilt = swiglu_elements_per_token(cfg)
        s.recompute_transient_bytes = int(rebuilt * tokens * act_bytes)
        s.microbatches_in_flight = min(pp - rank, max(1, train.global_batch // (train.micro_batch * dp)))
        if ep > 1:  # dispatch send + receive buffers of one MoE layer: tokens·K rows of H each way
            s.alltoall_buffer_bytes = int(2 * tokens * m.moe.top_k * m.hidden * act_bytes)
        plan.stages.append(s)
    return plan
