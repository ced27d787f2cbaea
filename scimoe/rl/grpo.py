"""GRPO recipe: sample G completions per prompt, score them with verifiable rewards, and step the policy
on the clipped, group-normalised objective.

Run: `scimoe-train recipe=grpo` (the toy addition task on a tiny model; `grpo.task=jsonl data.path=…
data.tokenizer=… checkpoint.init_weights=…` for real prompts). Reads top to bottom: layout → model and
frozen reference → task and rewards → resume → per step: rollout (KV cache, experts recorded) → rewards
and advantages → old/reference log-probs → update (router replay) → metrics and checkpoint.
Data and expert parallel under torchrun: each rank samples its share of the step's prompts (with ep the
ranks decode in lockstep, every forward being an all-to-all); gradients are summed (each rank's loss is its
share of the global token mean). Tested by `python -m pytest tests/rl`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time

import torch
from omegaconf import OmegaConf

from scimoe.config import Config
from scimoe.launch.run_dir import clear_finished, mark_finished
from scimoe.model import MoETransformer, build_model
from scimoe.parallel.runtime import make_runtime
from scimoe.parallel.state import dims_from_env, init_process_groups
from scimoe.rl.generate import Rollout, sample
from scimoe.rl.loss import group_advantages, policy_loss
from scimoe.rl.rewards import build_reward
from scimoe.rl.tasks import build_task
from scimoe.train import checkpoint
from scimoe.train.metrics import make_logger
from scimoe.train.optim import build_optimizer, lr_at
from scimoe.train.step import apply_update

log = logging.getLogger("scimoe")


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
    out = model(inputs, torch.arange(inputs.shape[1]).expand_as(inputs), replay=experts)
    logits = out.logits[:, p - 1:].float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, tokens[:, p:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, out


def grpo(cfg: Config, run_dir: str) -> list[dict]:
    g = cfg.grpo
    dims = dims_from_env(cfg.parallel)
    os.makedirs(run_dir, exist_ok=True)
    if dims.tp * dims.pp > 1:
        raise NotImplementedError("recipe=grpo runs with data and expert parallelism (parallel.tp and pp must be 1)")
    if g.prompts_per_step % dims.world_size:
        raise ValueError(f"config error at 'grpo.prompts_per_step': {g.prompts_per_step} prompts do not split evenly "
                         f"over {dims.world_size} ranks (every rank must sample as many, in step)")
    runtime = make_runtime(dims, init_process_groups(dims))
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    model = build_model(cfg.model, seed=cfg.train.seed)
    reference = copy.deepcopy(model) if g.kl_coef else None  # frozen: the starting policy
    runtime.prepare(model)
    if cfg.checkpoint.init_weights:
        source = checkpoint.find_resume_path(run_dir, cfg.checkpoint.init_weights, "checkpoint.init_weights")
        checkpoint.load_weights(source, model, runtime)
    if reference is not None:
        runtime.prepare(reference)  # sharded like the policy (experts over ep)
        reference.load_state_dict(model.state_dict())
        reference.eval().requires_grad_(False)
    # Under expert parallelism every forward is a collective: ranks decode in step until all are done.
    everyone_done = (lambda mine: not runtime.any_rank(not mine)) if dims.ep > 1 else None
    task = build_task(cfg)
    reward = build_reward(dict(g.rewards))
    optimizer = build_optimizer(model, cfg.train, runtime.optimizer_shards(model, cfg.parallel.zero))
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    start = 0
    resume_path = checkpoint.find_resume_path(run_dir, cfg.checkpoint.resume)
    if resume_path:
        start = checkpoint.load(resume_path, model, optimizer, runtime, dims.rank, dims.world_size)["step"]
        log.info("resumed from %s (step %d)", resume_path, start)
    logger = make_logger(cfg.logger, run_dir, dims.rank == 0, dataclasses.asdict(cfg), resume_step=start)
    generator = torch.Generator()
    records = []
    skipped_in_a_row = 0
    if dims.rank == 0 and start < cfg.train.steps:
        clear_finished(run_dir)
    try:
        for step in range(start, cfg.train.steps):
            generator.manual_seed(cfg.train.seed * 7919 + step * dims.world_size + dims.rank)
            began = time.perf_counter()
            prompts = task.batch(step, g.prompts_per_step, cfg.train.seed, dims.rank, dims.world_size)
            rollouts = [sample(model, ids, g.group_size, g.max_new_tokens, task.tokenizer.eos_id, g.temperature,
                               g.top_k, g.top_p, generator, use_cache=g.kv_cache, everyone_done=everyone_done)
                        for ids, _ in prompts]
            rollout_s = time.perf_counter() - began
            texts = [[task.tokenizer.decode(r.tokens[i, r.prompt_len:][r.completion_mask[i]].tolist())
                      for i in range(g.group_size)] for r in rollouts]
            rewards = torch.tensor([[reward(t, answer) for t in group] for group, (_, answer) in zip(texts, prompts)])
            advantages = group_advantages(rewards, g.scale_std).flatten()
            mask = torch.cat([r.completion_mask for r in rollouts])
            began = time.perf_counter()
            with torch.no_grad():
                old = torch.cat([r.logprobs for r in rollouts]) if g.old_logprobs == "rollout" else \
                    token_logprobs(model, rollouts, g.temperature, g.router_replay)[0]
                ref = token_logprobs(reference, rollouts, g.temperature, g.router_replay)[0] if reference else None
            logprob_s = time.perf_counter() - began
            began = time.perf_counter()
            optimizer.set_lr(lr_at(step, cfg.train))
            model.train()
            logp, entropy, out = token_logprobs(model, rollouts, g.temperature, g.router_replay)
            local_tokens = mask.sum()
            total_tokens = runtime.reduce_sum(local_tokens.clone())
            result = policy_loss(logp, old, advantages, mask, g.clip_low, g.clip_high, g.aggregation, ref,
                                 g.kl_coef, g.kl_estimator)
            share = local_tokens / total_tokens.clamp_min(1) if g.aggregation == "token_mean" else 1 / dims.world_size
            loss = result.loss * share + (out.balance_loss + out.z_loss) / dims.world_size
            loss.backward()
            global_loss = float(runtime.reduce_sum(loss.detach().double().reshape(1)))
            grad_norm, skipped = apply_update(model, optimizer, runtime, cfg.train.grad_clip, global_loss)
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            if skipped_in_a_row >= cfg.train.max_skipped_in_a_row:
                raise RuntimeError(f"{skipped_in_a_row} GRPO steps in a row had a non-finite loss or grad norm "
                                   f"(train.max_skipped_in_a_row={cfg.train.max_skipped_in_a_row}); stopping")
            update_s = time.perf_counter() - began
            mismatch = [a.replay_mismatch for a in out.moe if a.replay_mismatch is not None]
            stats = runtime.reduce_sum(torch.tensor([
                float(rewards.sum()), float(rewards.pow(2).sum()), rewards.numel(), float(mask.sum()),
                float((entropy.detach() * mask).sum()), result.clip_fraction * float(mask.sum()), result.kl * float(mask.sum()),
                sum(mismatch) / max(len(mismatch), 1), float(advantages.abs().sum()), advantages.numel()],
                dtype=torch.float64)).tolist()
            n, tokens = stats[2], max(stats[3], 1)
            seconds = rollout_s + logprob_s + update_s
            record = {
                "step": step + 1, "loss": float(result.loss.detach()), "reward_mean": stats[0] / n,
                "reward_std": max(stats[1] / n - (stats[0] / n) ** 2, 0.0) ** 0.5,
                "advantage_abs_mean": stats[8] / stats[9], "clip_fraction": stats[5] / tokens, "kl": stats[6] / tokens,
                "entropy": stats[4] / tokens, "response_length": tokens / n, "samples": int(n),
                "routing_mismatch": stats[7] / dims.world_size if g.router_replay else None,
                "grad_norm": grad_norm, "lr": lr_at(step, cfg.train), "tokens_per_s": tokens / seconds,
                "rollout_s": rollout_s, "logprob_s": logprob_s, "update_s": update_s, "skipped": int(skipped),
            }
            logger.log(record)
            records.append(record)
            if dims.rank == 0 and ((step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps):
                log.info("step %d | reward %.3f ± %.3f | clip %.3f | kl %.4f | len %.1f | mismatch %s | %.1fs",
                         step + 1, record["reward_mean"], record["reward_std"], record["clip_fraction"], record["kl"],
                         record["response_length"], record["routing_mismatch"], seconds)
            if step + 1 == cfg.train.steps or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                checkpoint.save(run_dir, step + 1, model, optimizer, {"step": step + 1}, config_yaml, runtime,
                                dims.rank, dims.world_size)
    finally:
        logger.close()
    if dims.rank == 0 and records and records[-1]["step"] == cfg.train.steps:
        mark_finished(run_dir, cfg.train.steps)
    return records
