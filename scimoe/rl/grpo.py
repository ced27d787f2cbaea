"""GRPO recipe: sample G completions per prompt, score them with verifiable rewards, and step the policy
on the clipped, group-normalised objective.

Run: `scimoe-train recipe=grpo` (the toy addition task on a tiny model; `grpo.task=jsonl data.path=…
data.tokenizer=… checkpoint.init_weights=…` for real prompts). Tested by `python -m pytest tests/rl`.
Reads top to bottom: session (layout, model, optimizer, resume, checkpoints, signals) → frozen reference →
task and rewards → per step: rollout (KV cache, experts recorded) → rewards and advantages → old/reference
log-probs → update (router replay) → metrics. Data and expert parallel under torchrun: each rank samples its
share of the step's prompts (with ep the ranks decode in lockstep, every forward being an all-to-all);
gradients are summed (each rank's loss is its share of the global token mean).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from scimoe.config import Config, ConfigError
from scimoe.model import MoETransformer
from scimoe.parallel.dims import ParallelDims
from scimoe.rl.generate import Rollout, sample
from scimoe.rl.loss import group_advantages, policy_loss
from scimoe.rl.rewards import build_reward
from scimoe.rl.tasks import build_task
from scimoe.train.session import Session


def token_logprobs(model: MoETransformer, rollouts: list[Rollout], temperature: float,
                   replay: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Per completion token log-probs [N, T] of the sampled tokens (temperature-scaled), their entropy,
    and the MoE aux outputs; with `replay` the recorded experts are forced."""
    tokens = torch.cat([r.tokens for r in rollouts])
    p = rollouts[0].prompt_len
    inputs = tokens[:, :-1]
    experts = None
    if replay:
        experts = [torch.cat([r.experts[j] for r in rollouts]).reshape(-1, rollouts[0].experts[j].shape[-1])
                   for j in range(len(rollouts[0].experts))]
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    out = model(inputs, positions, replay=experts)
    logits = out.logits[:, p - 1:].float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, tokens[:, p:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, out


@dataclasses.dataclass
class StepStats:
    """One step's sums over this rank's completions; `summed` adds them over the data-parallel ranks."""

    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    samples: float = 0.0
    tokens: float = 0.0
    """Completion tokens (up to and including EOS)."""
    entropy_sum: float = 0.0
    clipped_tokens: float = 0.0
    kl_sum: float = 0.0
    mismatch_sum: float = 0.0
    """Router-replay mismatch, averaged over this rank's MoE layers."""
    advantage_abs_sum: float = 0.0

    def summed(self, dims: ParallelDims) -> "StepStats":
        values = torch.tensor(dataclasses.astuple(self), dtype=torch.float64)
        return StepStats(*dims.reduce_sum(values).tolist())


def grpo(cfg: Config, run_dir: str, dims: ParallelDims | None = None) -> list[dict]:
    """Train the policy to `cfg.train.steps`; returns the per-step metrics."""
    g = cfg.grpo
    dims = dims or ParallelDims.from_config(cfg.parallel)
    if dims.tp * dims.pp > 1:
        raise NotImplementedError("recipe=grpo runs with data and expert parallelism (parallel.tp and pp must be 1)")
    if g.prompts_per_step % dims.dp:
        raise ConfigError(f"config error at 'grpo.prompts_per_step': {g.prompts_per_step} prompts do not split "
                          f"evenly over {dims.dp} data-parallel ranks (every rank must sample as many, in step)")
    records = []
    with Session(cfg, run_dir, dims) as session:
        dims, model = session.dims, session.model
        reference = session.starting_model() if g.kl_coef else None
        # Under expert parallelism every forward is a collective: ranks decode in step until all are done.
        everyone_done = (lambda mine: not dims.any_rank(not mine)) if dims.ep > 1 else None
        task = build_task(cfg)
        reward = build_reward(dict(g.rewards))
        session.resume()
        generator = torch.Generator()
        for step in session.steps():
            generator.manual_seed(cfg.train.seed * 7919 + step * dims.world_size + dims.rank)
            began = time.perf_counter()
            prompts = task.batch(step, g.prompts_per_step, cfg.train.seed, dims.groups.dp_rank, dims.dp)
            with session.autocast():
                rollouts = [sample(model, ids, g.group_size, g.max_new_tokens, task.tokenizer.eos_id, g.temperature,
                                   g.top_k, g.top_p, generator, use_cache=g.kv_cache, everyone_done=everyone_done)
                            for ids, _ in prompts]
            rollout_s = time.perf_counter() - began
            texts = [[task.tokenizer.decode(r.tokens[i, r.prompt_len:][r.completion_mask[i]].tolist())
                      for i in range(g.group_size)] for r in rollouts]
            rewards = torch.tensor([[reward(t, answer) for t in group] for group, (_, answer) in zip(texts, prompts)])
            advantages = group_advantages(rewards, g.scale_std).flatten().to(session.device)
            mask = torch.cat([r.completion_mask for r in rollouts])
            began = time.perf_counter()
            with torch.no_grad(), session.autocast():
                old = torch.cat([r.logprobs for r in rollouts]) if g.old_logprobs == "rollout" else \
                    token_logprobs(model, rollouts, g.temperature, g.router_replay)[0]
                ref = token_logprobs(reference, rollouts, g.temperature, g.router_replay)[0] if reference else None
            logprob_s = time.perf_counter() - began
            began = time.perf_counter()
            model.train()
            with session.autocast():
                logp, entropy, out = token_logprobs(model, rollouts, g.temperature, g.router_replay)
            local_tokens = mask.sum()
            total_tokens = dims.reduce_sum(local_tokens.clone())
            result = policy_loss(logp, old, advantages, mask, g.clip_low, g.clip_high, g.aggregation, ref,
                                 g.kl_coef, g.kl_estimator)
            share = local_tokens / total_tokens.clamp_min(1) if g.aggregation == "token_mean" else 1 / dims.dp
            loss = result.loss * share + (out.balance_loss + out.z_loss) / dims.dp
            loss.backward()
            global_loss = float(dims.reduce_sum(loss.detach().double().reshape(1)))
            grad_norm, skipped = session.update(global_loss)
            update_s = time.perf_counter() - began
            mismatch = [a.replay_mismatch for a in out.moe if a.replay_mismatch is not None]
            n_tokens = float(mask.sum())
            stats = StepStats(
                reward_sum=float(rewards.sum()), reward_sq_sum=float(rewards.pow(2).sum()), samples=rewards.numel(),
                tokens=n_tokens, entropy_sum=float((entropy.detach() * mask).sum()),
                clipped_tokens=result.clip_fraction * n_tokens, kl_sum=result.kl * n_tokens,
                mismatch_sum=sum(mismatch) / max(len(mismatch), 1),
                advantage_abs_sum=float(advantages.abs().sum())).summed(dims)
            n, tokens = stats.samples, max(stats.tokens, 1)
            seconds = rollout_s + logprob_s + update_s
            record = {
                "step": step + 1, "loss": float(result.loss.detach()), "reward_mean": stats.reward_sum / n,
                "reward_std": max(stats.reward_sq_sum / n - (stats.reward_sum / n) ** 2, 0.0) ** 0.5,
                "advantage_abs_mean": stats.advantage_abs_sum / n, "clip_fraction": stats.clipped_tokens / tokens,
                "kl": stats.kl_sum / tokens, "entropy": stats.entropy_sum / tokens, "response_length": tokens / n,
                "samples": int(n), "routing_mismatch": stats.mismatch_sum / dims.dp if g.router_replay else None,
                "grad_norm": grad_norm, "lr": session.optimizer.lr, "tokens_per_s": tokens / seconds,
                "rollout_s": rollout_s, "logprob_s": logprob_s, "update_s": update_s, "skipped": int(skipped),
            }
            records.append(record)
            summary = (f"reward {record['reward_mean']:.3f} ± {record['reward_std']:.3f} | clip "
                       f"{record['clip_fraction']:.3f} | kl {record['kl']:.4f} | len {record['response_length']:.1f}"
                       f" | mismatch {record['routing_mismatch']} | {seconds:.1f}s")
            if not session.end_step(record, {"step": step + 1}, summary):
                break
    return records
