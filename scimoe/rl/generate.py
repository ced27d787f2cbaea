"""Sampling from the policy with a KV cache in any training layout, recording each token's experts for router
replay; multi-turn rollouts that call tools live in scimoe/rl/tools.py on top of the same `Policy`.

Tested by `python -m pytest tests/rl/test_generate.py tests/distributed/test_generation.py`. `sample` draws `n`
completions of one prompt (temperature, top-k, then top-p filtering; defaults 0.8 / 50 / 0.95 as
Intern-S1-Pro recommends) until each has produced EOS or `max_new` tokens. With `use_cache=False` every step
re-runs the whole sequence (the baseline of benchmarks/rollout.py); both give the same tokens for the same
generator.

Layouts (`Policy`): the KV cache holds this rank's attention heads (tp) of this rank's layers (pp); under tp the
last position's vocabulary-sharded logits are gathered; under pp each decoding step runs the stages in order,
passing activations point to point, and the last stage broadcasts the logits to the pipeline. Every rank then
samples the same token with the same generator, so tp and pp ranks stay in step by construction; expert-
parallel ranks (whose forwards are collectives) decode until all of them are done. Sequence parallelism is
switched off while decoding (a step holds one position per sequence); the weights are the same.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist

from scimoe.model import MoETransformer


@dataclass
class Rollout:
    """`n` sequences of one prompt."""

    tokens: torch.Tensor
    """[n, P + N] prompt followed by the sampled tokens (EOS-padded after a sequence stops)."""
    prompt_len: int
    completion_mask: torch.Tensor
    """[n, N] True for sampled tokens up to and including the first EOS (tool responses: False)."""
    logprobs: torch.Tensor
    """[n, N] log-probability of each sampled token under the (temperature-scaled) sampling policy."""
    experts: list[torch.Tensor | None]
    """Per MoE layer of the model, [n, P + N − 1, K] experts each input token was routed to (router replay);
    None for layers on other pipeline stages."""
    lengths: torch.Tensor | None = None
    """[n] tokens of each trajectory after the prompt, tool responses included (None: up to its last sampled one)."""

    @property
    def completion_length(self) -> torch.Tensor:
        if self.lengths is not None:
            return self.lengths
        last = torch.arange(1, self.completion_mask.shape[1] + 1, device=self.completion_mask.device)
        return (last * self.completion_mask).max(dim=1).values


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits, then the smallest set whose probability reaches top_p; others → −inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Policy:
    """The policy's forward for decoding in this rank's layout (see the module docstring). `dims` and
    `chunks` as the session built them; without them, one process."""

    def __init__(self, model: MoETransformer, dims=None, chunks: list | None = None) -> None:
        self.model, self.dims, self.chunks = model, dims, chunks or []
        self.moe_index = {}  # decoder layer → its index among the model's MoE layers
        for i in range(model.cfg.moe.dense_layers, model.cfg.layers):
            self.moe_index[i] = len(self.moe_index)
        self.device = next(p for p in model.parameters()).device

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.model.layers]

    @contextlib.contextmanager
    def decoding(self):
        """Eval mode, and the layout's communication without sequence parallelism, for the duration."""
        from scimoe.parallel.parallelize import install_communication

        was_training = self.model.training
        self.model.eval()
        plain = self.dims is not None and self.dims.sp
        if plain:
            install_communication(self.model, replace(self.dims, sequence_parallel=False))
        try:
            yield self
        finally:
            if plain:
                install_communication(self.model, self.dims)
            self.model.train(was_training)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: list[dict] | None):
        """Full-vocabulary float32 logits of each row's last position [n, V], the same on every rank, and per MoE
        layer the experts of every input token [n, t, K] (None for layers on other stages)."""
        n, t = ids.shape
        experts: list[torch.Tensor | None] = [None] * len(self.moe_index)
        if not self.chunks:
            out = self.model(ids, positions, kv_cache=cache)
            for layer, aux in zip(self._moe_layers(range(len(self.model.layers))), out.moe):
                experts[self.moe_index[layer]] = aux.indices.view(n, t, -1)
            return self.model.comm.full_logits(out.logits[:, -1:]).squeeze(1).float(), experts
        pp, g = self.dims.pp, self.dims.groups
        last_owner = (pp * self.dims.pp_virtual - 1) % pp
        logits = None
        x = None
        for stage in range(pp * self.dims.pp_virtual):
            owner = stage % pp
            if owner != g.pp_rank:
                continue
            chunk = self.chunks[stage // pp]
            if chunk.first:
                x = self.model.embed(ids)
            else:
                x = torch.empty(n, t, self.model.cfg.hidden, device=self.device)
                dist.recv(x, group=g.pp, group_src=(stage - 1) % pp)
            x, auxes = self.model.run_layers(x, positions, chunk.layer_ids, kv_cache=cache)
            for layer, aux in zip(self._moe_layers(chunk.layer_ids), auxes):
                experts[self.moe_index[layer]] = aux.indices.view(n, t, -1)
            if chunk.last:
                logits = self.model.comm.full_logits(self.model.output(x[:, -1:], None)[0]).squeeze(1).float()
            else:
                dist.send(x.float().contiguous(), group=g.pp, group_dst=(stage + 1) % pp)
        if logits is None:
            logits = torch.empty(n, self.model.cfg.vocab_size, device=self.device)
        dist.broadcast(logits, group=g.pp, group_src=last_owner)
        return logits, experts

    def _moe_layers(self, layer_ids) -> list[int]:
        return [i for i in layer_ids if i in self.moe_index]


@torch.no_grad()
def sample(policy: Policy | MoETransformer, prompt: list[int], n: int, max_new: int, eos_id: int,
           temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, generator: torch.Generator | None = None,
           use_cache: bool = True, everyone_done: Callable[[bool], bool] | None = None) -> Rollout:
    """`everyone_done(mine)`: whether all ranks that must step together (expert parallelism: every forward
    is a collective) are done; by default this rank alone decides."""
    policy = policy if isinstance(policy, Policy) else Policy(policy)
    device = policy.device
    p = len(prompt)
    tokens = torch.tensor(prompt, device=device).repeat(n, 1)
    caches = policy.new_cache() if use_cache else None
    routed: list[list[torch.Tensor | None]] = []
    logprobs, done = [], torch.zeros(n, dtype=torch.bool, device=device)
    step_input, positions = tokens, torch.arange(p, device=device).expand(n, p)
    with policy.decoding():
        for step in range(max_new):
            last, experts = policy.forward(step_input, positions, caches)
            routed = [r + [x] for r, x in zip(routed, experts)] if routed and use_cache else [[x] for x in experts]
            logits = last / temperature
            probs = filter_logits(logits, top_k, top_p).softmax(-1)
            choice = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
            choice = torch.where(done, torch.full_like(choice, eos_id), choice)
            logprobs.append(logits.log_softmax(-1).gather(-1, choice[:, None]).squeeze(-1))
            tokens = torch.cat((tokens, choice[:, None]), dim=1)
            done = done | (choice == eos_id)
            if step == max_new - 1 or (everyone_done or bool)(bool(done.all())):
                break
            if use_cache:
                step_input, positions = choice[:, None], torch.full((n, 1), p + step, device=device)
            else:
                step_input, positions = tokens, torch.arange(tokens.shape[1], device=device).expand(n, -1)
    completion = tokens[:, p:]
    is_eos = completion == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((n,), completion.shape[1], device=device))
    mask = torch.arange(completion.shape[1], device=device)[None] <= first_eos[:, None]
    experts = [None if parts[0] is None else torch.cat(parts, dim=1)[:, : tokens.shape[1] - 1] for parts in routed]
    return Rollout(tokens=tokens, prompt_len=p, completion_mask=mask, logprobs=torch.stack(logprobs, 1), experts=experts)
