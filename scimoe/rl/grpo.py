"""GRPO recipe: sample G completions per prompt, score them with verifiable rewards, and step the policy
on the clipped, group-normalised objective.

Run: `scimoe-train recipe=grpo` (the toy addition task on a tiny model; `grpo.task=jsonl data.path=…
data.tokenizer=… checkpoint.init_weights=…` for real prompts; `grpo.task=lookup grpo.max_turns=2` for the
multi-turn tool toy). Tested by `python -m pytest tests/rl tests/distributed/test_generation.py`.
Reads top to bottom: session (layout, model, optimizer, resume, checkpoints, signals) → frozen reference →
task and rewards → per step: rollout (KV cache, experts recorded, tools called) → rewards and advantages →
old/reference log-probs → update (router replay) → metrics. Every layout training has runs it: each
data-parallel rank samples its share of the prompts, tp and pp ranks of one replica sample the same tokens
(scimoe/rl/generate.py), expert-parallel ranks decode in lockstep; the update is this rank's share of the
global loss, its gradients summed like pretraining's.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from scimoe.config import Config, ConfigError
from scimoe.parallel.dims import ParallelDims
from scimoe.rl.generate import Policy, sample
from scimoe.rl.loss import group_advantages, tis_weight
from scimoe.rl.rewards import RewardFailure, build_reward
from scimoe.rl.scoring import completions, logprob_head, policy_head, rollout_batch
from scimoe.rl.tasks import build_task
from scimoe.rl.tools import build_tools, sample_with_tools
from scimoe.train.session import Session
from scimoe.train.step import HeadStepResult, forward_with_head, head_step

log = logging.getLogger("scimoe")


@dataclasses.dataclass
class StepStats:
    """One step's sums over this rank's completions; `summed` adds them over the data-parallel ranks."""

    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    samples: float = 0.0
    tokens: float = 0.0
    """Completion tokens the model sampled (up to and including EOS; tool responses not counted)."""
    entropy_sum: float = 0.0
    clipped_tokens: float = 0.0
    kl_sum: float = 0.0
    mismatch: float = 0.0
    """Router-replay mismatch, averaged over the model's MoE layers."""
    advantage_abs_sum: float = 0.0
    tool_calls: float = 0.0
    good_tool_calls: float = 0.0
    """Tool calls that parsed and named an allowed tool."""
    skipped_groups: float = 0.0
    """Groups left out of the update because a reward was not finite."""
    reward_errors: float = 0.0
    """Completions whose reward function raised (scored 0 for that part, see grpo.reward_errors)."""

    def add_step(self, rewards: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, result) -> None:
        """This rank's sums of the step's rewards, advantages, tokens and the update's statistics."""
        n_tokens, extras = float(mask.sum()), result.extras
        self.reward_sum, self.reward_sq_sum = float(rewards.sum()), float(rewards.pow(2).sum())
        self.samples, self.tokens, self.entropy_sum = rewards.numel(), n_tokens, extras["entropy_sum"]
        self.clipped_tokens, self.kl_sum = extras["clip_fraction"] * n_tokens, extras["kl"] * n_tokens
        self.mismatch, self.advantage_abs_sum = result.routing_mismatch, float(advantages.abs().sum())

    def summed(self, dims: ParallelDims) -> "StepStats":
        values = torch.tensor(dataclasses.astuple(self), dtype=torch.float64)
        return StepStats(*dims.reduce_sum(values).tolist())


def _check_layout(cfg: Config, dims: ParallelDims) -> None:
    g = cfg.grpo
    if dims.cp > 1:
        raise ConfigError(f"config error at 'parallel.cp': recipe=grpo with context parallelism ({dims.cp}) is not "
                          "built (generation keeps a KV cache of whole sequences); use parallel.cp=1")
    if dims.pp_virtual > 1:
        raise ConfigError("config error at 'parallel.pp_virtual': recipe=grpo updates with one micro-batch per step, "
                          "which megatron's interleaved schedule cannot run; use parallel.pp_virtual=1")
    if g.prompts_per_step % dims.dp:
        raise ConfigError(f"config error at 'grpo.prompts_per_step': {g.prompts_per_step} prompts do not split "
                          f"evenly over {dims.dp} data-parallel ranks (every rank must sample as many, in step)")
    if dims.routes_token_shares and (g.prompts_per_step // dims.dp * g.group_size) % dims.tp:
        raise ConfigError(f"config error at 'grpo.group_size': each rank's {g.prompts_per_step // dims.dp} × "
                          f"{g.group_size} sequences must split over parallel.tp ({dims.tp}) with tp × ep")


def _score_rewards(reward, texts: list[list[str]], prompts, task, stats: StepStats, dims: ParallelDims,
                   step: int) -> torch.Tensor:
    """[B, G] rewards; a group with a non-finite reward is reported, counted and left out (all zeros). A step in
    which every reward function call failed, on every rank, stops the run: nothing could be learnt from it."""
    rows, errors_before = [], reward.errors
    for group, (ids, answer) in zip(texts, prompts):
        row = [reward(text, answer) for text in group]
        if not all(math.isfinite(r) for r in row):
            log.warning("grpo: a reward of %s is not finite for the prompt %r; the group is left out of this update",
                        row, task.tokenizer.decode(ids)[:200])
            stats.skipped_groups += 1
            row = [0.0] * len(row)
        rows.append(row)
    stats.reward_errors = reward.errors - errors_before
    failed, scored = dims.reduce_sum(torch.tensor([stats.reward_errors, sum(map(len, texts))], dtype=torch.float64))
    if scored and failed == scored:
        raise RewardFailure(f"step {step + 1}: the reward function raised for every one of the {int(scored)} "
                            f"completions (see the first traceback above); stopping: nothing can be learnt from it")
    return torch.tensor(rows, dtype=torch.float64)


def _rollouts(session: Session, policy: Policy, prompts, g, task, tools, generator, everyone_done, stats) -> list:
    """G completions of every prompt, sampled by the policy (with tool calls when the task has tools)."""
    with session.autocast():
        if tools is None:
            return [sample(policy, ids, g.group_size, g.max_new_tokens, task.tokenizer.eos_id, g.temperature, g.top_k,
                           g.top_p, generator, g.kv_cache, everyone_done) for ids, _ in prompts]
        return [sample_with_tools(policy, ids, g, task.tokenizer, tools, generator, everyone_done, stats)
                for ids, _ in prompts]


def _old_and_reference_logprobs(session: Session, g, batch: dict, rollout_logp, reference, reference_chunks):
    """(old policy's log-probs, the reference's or None, TIS weights or None) of the sampled tokens."""
    dims, dtype = session.dims, session.cfg.train.dtype
    with torch.no_grad():
        def score(m, chunks):
            return forward_with_head(m, chunks, batch, logprob_head(m.comm, g.temperature), dims, dtype,
                                     backward=False)[0]["logp"].to(session.device)
        old = rollout_logp if g.old_logprobs == "rollout" and not g.tis_cap else score(session.model, session.chunks)
        weights = tis_weight(old, rollout_logp, g.tis_cap) if g.old_logprobs == "rollout" and g.tis_cap else None
        ref = score(reference, reference_chunks) if reference is not None else None
    return old, ref, weights


def _record(step: int, total: "StepStats", result: HeadStepResult, g, dims: ParallelDims, session: Session,
            seconds: tuple[float, float, float], with_tools: bool) -> dict:
    """The step's metrics line from the statistics summed over ranks."""
    n, tokens = total.samples, max(total.tokens, 1)
    rollout_s, logprob_s, update_s = seconds
    record = {
        "step": step + 1, "loss": result.extras["loss"], "reward_mean": total.reward_sum / n,
        "reward_std": max(total.reward_sq_sum / n - (total.reward_sum / n) ** 2, 0.0) ** 0.5,
        "advantage_abs_mean": total.advantage_abs_sum / n, "clip_fraction": total.clipped_tokens / tokens,
        "kl": total.kl_sum / tokens, "entropy": total.entropy_sum / tokens, "response_length": tokens / n,
        "samples": int(n), "routing_mismatch": total.mismatch / dims.dp if g.router_replay else None,
        "grad_norm": result.grad_norm, "lr": session.optimizer.lr, "tokens_per_s": tokens / sum(seconds),
        "rollout_s": rollout_s, "logprob_s": logprob_s, "update_s": update_s, "skipped": int(result.skipped),
        "skipped_groups": int(total.skipped_groups), "reward_errors": int(total.reward_errors),
    }
    if with_tools:
        record["tool_calls_per_sample"] = total.tool_calls / n
        record["well_formed_tool_calls"] = total.good_tool_calls / max(total.tool_calls, 1)
    return record


def grpo(cfg: Config, run_dir: str, dims: ParallelDims | None = None) -> list[dict]:
    """Train the policy to `cfg.train.steps`; returns the per-step metrics."""
    g = cfg.grpo
    dims = dims or ParallelDims.from_config(cfg.parallel)
    _check_layout(cfg, dims)
    records = []
    with Session(cfg, run_dir, dims) as session:
        dims, model, dtype = session.dims, session.model, cfg.train.dtype
        policy = Policy(model, dims, session.chunks)
        reference, reference_chunks = session.starting_model() if g.kl_coef else (None, [])
        # Under expert parallelism every forward is a collective: ranks decode in step until all are done.
        everyone_done = (lambda mine: not dims.any_rank(not mine)) if dims.ep > 1 else None
        task = build_task(cfg)
        reward = build_reward(dict(g.rewards), g.reward_errors)
        tools = build_tools(g, task)
        session.resume()
        generator = torch.Generator()
        for step in session.steps():
            generator.manual_seed(cfg.train.seed * 7919 + step * dims.dp + dims.groups.dp_rank)  # tp, pp peers alike
            stats = StepStats()
            began = time.perf_counter()
            prompts = task.batch(step, g.prompts_per_step, cfg.train.seed, dims.groups.dp_rank, dims.dp)
            rollouts = _rollouts(session, policy, prompts, g, task, tools, generator, everyone_done, stats)
            rollout_s = time.perf_counter() - began
            texts = [[task.tokenizer.decode(r.tokens[i, r.prompt_len:].tolist()[:int(r.completion_length[i])])
                      for i in range(g.group_size)] for r in rollouts]
            rewards = _score_rewards(reward, texts, prompts, task, stats, dims, step)
            advantages = group_advantages(rewards, g.scale_std, g.std).flatten().to(session.device)
            mask, rollout_logp = completions(rollouts)
            batch = rollout_batch(rollouts, g.router_replay, dims.tp if dims.sp else 1)
            began = time.perf_counter()
            old, ref, weights = _old_and_reference_logprobs(session, g, batch, rollout_logp, reference, reference_chunks)
            logprob_s = time.perf_counter() - began
            began = time.perf_counter()
            local_tokens = mask.sum()
            token_mean = g.aggregation == "token_mean" and g.ratio_level == "token"
            share = local_tokens / dims.reduce_sum(local_tokens.clone()).clamp_min(1) if token_mean else 1 / dims.dp
            head = policy_head(model.comm, g.temperature, g, old, ref, advantages, mask, weights, share)
            result = head_step(model, session.optimizer, batch, head, share, cfg.train.grad_clip, dims, dtype,
                               session.chunks, session.buckets)
            update_s = time.perf_counter() - began
            stats.add_step(rewards, advantages, mask, result)
            record = _record(step, stats.summed(dims), result, g, dims, session, (rollout_s, logprob_s, update_s),
                             tools is not None)
            records.append(record)
            summary = (f"reward {record['reward_mean']:.3f} ± {record['reward_std']:.3f} | clip "
                       f"{record['clip_fraction']:.3f} | kl {record['kl']:.4f} | len {record['response_length']:.1f}"
                       f" | mismatch {record['routing_mismatch']} | {sum((rollout_s, logprob_s, update_s)):.1f}s")
            if not session.end_step(record, {"step": step + 1}, summary):
                break
    return records
