"""Guided rollouts: every token drawn from a mixture of the policy and a frozen guide policy, the two models
decoding in lockstep, each on its own KV cache (teacher-mixed sampling: MiniLLM, Gu et al., ICLR 2024); or
(guide.mode=traces, `TracesSampler`) k whole completions of each prompt's group written by the guide alone,
beside the policy's G − k (LUFFY's mixed-policy GRPO, Yan et al. 2025).

The distribution mixed, at each step, from the policy's logits z_π and the guide's z_g at the sampling
temperature τ:

    π_S = softmax(z_π / τ) on S, renormalised     S: the policy's kept set under top_k / top_p (every token
                                                  without truncation): what an unguided rollout draws from and
                                                  what the trainer scores the policy's tokens under
    g_S = softmax(z_g / τ) on the same S, renormalised
    q   = α·π_S + (1 − α)·g_S

Both are truncated to one kept set, the policy's, so every token q can draw is one the trainer scores π over,
and π_S(y) / q(y) ≤ 1/α for every such token: the sampler correction's weights π_old / q are bounded by 1/α
(`losses.off_policy`). (Truncating the guide to its own kept set instead would let it draw tokens outside the
policy's, whose weight should be 0 and which the trainer scores over its kept set plus the token.) The
sampler reports log q for each token it draws.

Vocabularies: the policy and the guide share a tokenizer, but their heads may differ in size (Qwen2.5-0.5B
has 151,936 rows, 7B 152,064, for len(tokenizer) = 151,665 tokens). Both are aligned to len(tokenizer): rows
past it (padding rows, no token) are dropped and rows a smaller head lacks are -inf, so neither model can put
a token the tokenizer does not know into the mixture. The policy's kept set is taken on its whole head, as the
trainer takes it; dropping padding rows only raises π_S on real tokens above the trainer's π, so the
trainer's π / q stays ≤ 1/α.

Randomness is the loop's (`generation.sampling`): one generator seeded from the call's seed, one uniform per
live row and step, the token drawn by `draw_tokens` (inversion of the CDF) from log q. Inversion makes the
policy's own draw with the same uniform a function of that number, which says what the guide changed:
`MixtureDraw` counts, per completion, the tokens where argmax q ≠ argmax π_S and the tokens where π_S alone
would have drawn another token from the same uniform; a completion is *changed* when one of its tokens is:
the policy alone, given the uniforms this completion was drawn with, would have written another completion.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from alignkit.config.load import ConfigError
from alignkit.generation.backends import ModelSampler, Sampled
from alignkit.generation.decode_loop import (
    draw_from,
    draw_tokens,
    loop_decoder,
    loop_generator,
    sample_ids_with_loop,
)
from alignkit.generation.resolve import loop_refusal, with_resolved_backend
from alignkit.generation.sampling import eos_ids, sampling_warpers
from alignkit.models.load import check_model_source, disable_dropout, load_tokenizer, vocabulary_difference
from alignkit.models.reference import frozen_model

GUIDED_CORRECTION = "token_truncate"
"""What sampler_correction=auto applies to a guided rollout: one weight π_old / q per token (MiniLLM's
per-token approximation of the sequence ratio), which a cap C ≥ 1/α never truncates."""


def aligned(scores: torch.Tensor, size: int) -> torch.Tensor:
    """(b, V) scores of a head with V rows -> (b, size), one column per token of the tokenizer: rows past `size`
    (padding rows) dropped, rows a smaller head lacks set to -inf (never drawn)."""
    V = scores.shape[-1]
    if V >= size:
        return scores[:, :size]
    return torch.nn.functional.pad(scores, (0, size - V), value=float("-inf"))


def mixture_log_probs(
    policy_logits: torch.Tensor,
    guide_logits: torch.Tensor,
    *,
    alpha: float,
    vocab_size: int,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q, the policy's scores), each (b, vocab_size): log q = log(α·π_S + (1 − α)·g_S) (module docstring)
    from (b, V_π) policy and (b, V_g) guide logits, and the policy's tempered, truncated scores as the unguided
    loop draws from them (-inf outside S), aligned to the tokenizer's `vocab_size` tokens. q is 0 (log -inf)
    outside S."""
    policy = policy_logits.float()
    for warp in sampling_warpers(
        temperature, top_k=top_k, top_p=top_p
    ):  # the loop's scores, on the whole head
        policy = warp(None, policy)
    policy = aligned(policy, vocab_size)  # (b, V)
    guide = guide_logits.float()
    for warp in sampling_warpers(temperature):  # the guide at the same temperature ...
        guide = warp(None, guide)
    guide = aligned(guide, vocab_size).masked_fill(~policy.isfinite(), float("-inf"))  # ... on the same S
    log_pi = policy.log_softmax(-1)
    if alpha >= 1:
        return log_pi, policy
    # A guide with no mass on S (every kept token a row it lacks) gives nan rows: q is then π_S alone.
    log_g = guide.log_softmax(-1).nan_to_num(nan=float("-inf"))
    log_q = torch.logaddexp(log_pi + math.log(alpha), log_g + math.log1p(-alpha))
    return log_q, policy


class MixtureDraw:
    """`generation.decode_loop.decode_lockstep`'s `choose` for [policy, guide] logits: one token per row drawn from
    q (`mixture_log_probs`) with one uniform from `generator`, its log q returned; per completion it counts the
    tokens where the guide changed the argmax and those where π_S alone would have drawn another token from the
    same uniform (`details`)."""

    def __init__(
        self, *, alpha: float, vocab_size: int, sampling: dict, generator: torch.Generator, rows: int, device
    ):
        self.alpha, self.vocab_size, self.sampling, self.generator = alpha, vocab_size, sampling, generator
        self.argmax_changed = torch.zeros(rows, device=device)  # (N,) per completion
        self.tokens_changed = torch.zeros(rows, device=device)  # (N,)

    def __call__(self, logits: list[torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_q, policy = mixture_log_probs(
            logits[0], logits[1], alpha=self.alpha, vocab_size=self.vocab_size, **self.sampling
        )  # (b, V), (b, V)
        u = torch.rand(len(rows), generator=self.generator, device=log_q.device, dtype=torch.float64)
        new = draw_tokens(log_q, u)  # (b,)
        own = draw_tokens(policy, u)  # what the policy alone draws with the same uniform
        self.argmax_changed[rows] += (log_q.argmax(-1) != policy.argmax(-1)).float()
        self.tokens_changed[rows] += (own != new).float()
        return new, log_q.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)

    def details(self) -> dict[str, list[float]]:
        """Per completion: argmax_changed and tokens_changed (counts of its tokens)."""
        return {
            "argmax_changed": self.argmax_changed.tolist(),
            "tokens_changed": self.tokens_changed.tolist(),
        }


@torch.no_grad()
def guided_sample_ids(
    policy,
    guide,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    alpha: float,
    num_samples: int = 1,
    seed: int = 0,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 64,
) -> tuple[list[list[int]], list[list[float]], dict[str, list[float]]]:
    """`num_samples` completions of every prompt drawn token by token from q = α·π_S + (1 − α)·g_S (module
    docstring), prompt-major, each cut after its first EOS (the policy's EOS ids): (ids, log q of each drawn
    token, `MixtureDraw.details`). Seeded and batched as `sample_ids`' loop (`batch_size` decides which
    uniforms each completion draws); the policy is put in eval mode and given back as it was, the guide stays
    frozen. Both models must be ones the lean loop drives (`generation.decode_loop.loop_decoder`)."""
    if temperature <= 0:
        raise ValueError(f"a guided rollout samples: temperature must be > 0, got {temperature}")
    decoders = [loop_decoder(m) for m in (policy, guide)]
    if None in decoders:
        which = type((policy, guide)[decoders.index(None)]).__name__
        raise ValueError(f"the lean loop cannot drive {which}; a guided rollout decodes both models in it")
    device = next(policy.parameters()).device
    draw = MixtureDraw(
        alpha=alpha,
        vocab_size=len(tokenizer),
        sampling={"temperature": temperature, "top_k": top_k, "top_p": top_p},
        generator=loop_generator(seed, device),
        rows=len(prompt_ids) * num_samples,
        device=device,
    )
    was_training = policy.training
    policy.eval()
    try:
        ids, logps = sample_ids_with_loop(
            decoders,
            prompt_ids,
            num_samples=num_samples,
            choose=draw,
            eos=eos_ids(policy, tokenizer),
            pad_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            device=device,
        )
    finally:
        policy.train(was_training)
    return ids, logps, draw.details()


class GuidedSampler:
    """The `Sampler` of a guided run's rollouts: the policy's tokens mixed with a frozen guide's at the weight
    `alpha` the run sets for each step (`OnlineRun.collect`, `GuideSettings.alpha_at`). It reports log q, and is
    not the trainer while α < 1, so the sampler correction weights each token by π_old / q; at α = 1 it is the
    unguided loop sampler, bit for bit. Each completion's details: alpha, argmax_changed, tokens_changed."""

    backend = "loop"

    def __init__(self, guide: torch.nn.Module):
        self.guide = guide
        self.alpha = 1.0
        """The policy's weight in the mixture for the next rollout."""

    @property
    def is_trainer(self) -> bool:
        return self.alpha >= 1

    def for_step(self, guide, step: int, total_steps: int, sampler) -> GuidedSampler:
        """This sampler at the step's α (`GuideSettings.alpha_at` of the `guide` settings); `sampler`, the run's
        own, is not used: the mixture decodes the policy in the lean loop itself."""
        self.alpha = guide.alpha_at(step, total_steps)
        return self

    def sync(self, model, version: int) -> None:
        """Nothing to do: the policy samples itself, and the guide never changes."""

    def sample(
        self, model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int, seed: int, **settings
    ) -> Sampled:
        if self.alpha >= 1:
            plain = ModelSampler("loop").sample(
                model, tokenizer, prompt_ids, num_samples=num_samples, seed=seed, **settings
            )
            zeros = [0.0] * len(plain.completion_ids)
            details = {"argmax_changed": zeros, "tokens_changed": zeros}
            return dataclasses.replace(plain, details={"alpha": [1.0] * len(zeros), **details})
        ids, logps, details = guided_sample_ids(
            model,
            self.guide,
            tokenizer,
            prompt_ids,
            alpha=self.alpha,
            num_samples=num_samples,
            seed=seed,
            **settings,
        )
        details = {"alpha": [self.alpha] * len(ids), **details}
        return Sampled(ids, logps, details=details, auto_correction=GUIDED_CORRECTION)


GUIDE_SEED_OFFSET = 1 << 40
"""Added to a rollout's seed for its guide traces: a stream of their own, a function of the step's seed (a
resume redraws them), apart from every step's and process's policy seed."""


@torch.no_grad()
def guide_trace_ids(
    guide,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    eos: set[int],
    num_samples: int,
    seed: int,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 64,
) -> tuple[list[list[int]], list[list[float]]]:
    """`num_samples` completions of every prompt written by the guide alone in the lean loop, prompt-major:
    (ids, the guide's log-prob of each drawn token). Its scores are aligned to the tokenizer's tokens first
    (`aligned`: a padding row is never drawn, so the policy can score every id), then tempered and truncated
    by the rollout's settings, and each completion is cut after its first token in `eos` (the policy's EOS
    ids, which decide whether a completion of the rollout ended). Seeded and batched as `sample_ids`' loop."""
    decoder = loop_decoder(guide)
    if decoder is None:
        raise ValueError(f"the lean loop cannot drive {type(guide).__name__}; guide traces are sampled in it")
    if temperature <= 0:
        raise ValueError(f"guide traces are sampled: temperature must be > 0, got {temperature}")
    device = next(guide.parameters()).device
    draw = draw_from(sampling_warpers(temperature, top_k=top_k, top_p=top_p), loop_generator(seed, device))
    size = len(tokenizer)
    return sample_ids_with_loop(
        [decoder],
        prompt_ids,
        num_samples=num_samples,
        choose=lambda logits, rows: draw([aligned(logits[0].float(), size)], rows),
        eos=eos,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
    )


class TracesSampler:
    """The `Sampler` of a guide.mode=traces run (LUFFY's mixed-policy GRPO): of each prompt's G completions, the
    first G − k are the policy's, drawn by the run's own sampler (its backend, the rollout's seed), and the last
    k the frozen guide's alone (`guide_trace_ids`, seeded from the rollout's seed), k = `traces` as the run sets
    it for each step (`GuideSettings.traces_at`; at k = 0, the policy's sampler alone, bit for bit). The guide's
    rows report the guide's own log-probs; `is_trainer` and the auto correction are the policy sampler's, for
    its rows: the guide's are shaped (`losses.policy_shaping`), never importance-corrected
    (`rollout.sampler_correction` leaves them out). Each completion's details: guide_trace (1: the guide's
    trace, 0: the policy's sample) and traces (k)."""

    def __init__(self, guide: torch.nn.Module):
        self.guide = guide
        self.traces = 0
        """k, the guide's completions in each group of the next rollout."""
        self.policy_sampler = ModelSampler("auto")
        """What draws the policy's completions: the run's own sampler, synced (`for_step`)."""

    @property
    def backend(self) -> str:
        return self.policy_sampler.backend

    @property
    def is_trainer(self) -> bool:
        return self.policy_sampler.is_trainer

    def for_step(self, guide, step: int, total_steps: int, sampler) -> TracesSampler:
        """This sampler with the step's k (`GuideSettings.traces_at` of the `guide` settings), the policy's
        completions drawn by `sampler`, the run's own, already synced to the policy."""
        self.traces = guide.traces_at(step, total_steps)
        self.policy_sampler = sampler
        return self

    def sync(self, model, version: int) -> None:
        """The policy's sampler follows `model` (the guide never changes)."""
        self.policy_sampler.sync(model, version)

    def sample(
        self, model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int, seed: int, **settings
    ) -> Sampled:
        k, G = self.traces, num_samples
        if not 0 <= k < G:
            raise ValueError(
                f"{k} guide traces in groups of {G}: 0 <= k < G leaves the policy samples of its own"
            )
        own = self.policy_sampler.sample(
            model, tokenizer, prompt_ids, num_samples=G - k, seed=seed, **settings
        )
        if own.details:
            raise ValueError(f"the policy's sampler reports {sorted(own.details)}, which guide traces do not")
        ids, logps, flags = list(own.completion_ids), list(own.logps), [0.0] * len(own.completion_ids)
        if k:
            guide_ids, guide_logps = guide_trace_ids(
                self.guide,
                tokenizer,
                prompt_ids,
                eos=eos_ids(model, tokenizer),
                num_samples=k,
                seed=seed + GUIDE_SEED_OFFSET,
                **settings,
            )
            ids, logps, flags = [], [], []
            for i in range(len(prompt_ids)):  # prompt-major: the policy's G - k, then the guide's k
                ids += own.completion_ids[i * (G - k) : (i + 1) * (G - k)] + guide_ids[i * k : (i + 1) * k]
                logps += own.logps[i * (G - k) : (i + 1) * (G - k)] + guide_logps[i * k : (i + 1) * k]
                flags += [0.0] * (G - k) + [1.0] * k
        details = {"guide_trace": flags, "traces": [float(k)] * len(ids)}
        return Sampled(ids, logps, details=details, auto_correction=own.auto_correction)


def with_guided_backend(cfg):
    """`generation.resolve.with_resolved_backend` for a command with a `guide:` section: with a mixture guide
    both models decode in the lean loop, so generation.backend (auto or loop: the others are refused by the
    config's relations) resolves to loop, and a model the loop cannot drive is refused, naming it. With traces
    the policy samples on its own backend, resolved as without a guide, and the guide in the lean loop: a
    guide it cannot drive is refused."""
    g = cfg.guide
    if g.model and g.mode == "traces":  # the policy samples on its own backend; the guide in the lean loop
        check_model_source(g.model, "guide.model")
        if (why := loop_refusal(g.model, cfg.trust_remote_code)) is not None:
            raise ConfigError(
                f"guide.mode=traces samples the guide in the lean loop sampler, which cannot drive guide.model: {why}"
            )
        return with_resolved_backend(cfg)
    if not g.model:
        return with_resolved_backend(cfg)
    for key, name in (("model", cfg.model), ("guide.model", g.model)):
        if not name:
            raise ConfigError(f"{key} is not set: give {key}=<hub name or local folder>")
        check_model_source(name, key)
        if (why := loop_refusal(name, cfg.trust_remote_code)) is not None:
            raise ConfigError(
                f"guide.mode=mixture decodes the policy and the guide together in the lean loop sampler, "
                f"which cannot drive {key}: {why}"
            )
    return dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, backend="loop"))


def load_guided_sampler(cfg, tokenizer, device) -> GuidedSampler | TracesSampler | None:
    """The guided sampler of a run whose config has a `guide:` section (`GuidedSampler` for guide.mode=mixture,
    `TracesSampler` for traces), or None without a guide: the guide loaded from guide.model as a reference is
    (cfg.dtype, on `device`), frozen (eval mode, no gradient: never in the optimizer nor a checkpoint), after
    refusing a guide whose tokenizer is not the policy's (`tokenizer`), naming both."""
    g = cfg.guide
    if not g.model:
        return None
    policy_source = cfg.tokenizer or cfg.model
    guide_tokenizer = load_tokenizer(g.model, cfg.trust_remote_code)
    difference = vocabulary_difference(
        tokenizer.get_vocab(), guide_tokenizer.get_vocab(), ("the policy's", "the guide's")
    )
    if difference:
        raise ConfigError(
            f"guide.model {g.model} does not share the policy's tokenizer ({policy_source}): {difference}. A guided "
            "rollout mixes the two models' next-token distributions token by token, or trains the policy on the "
            "guide's token ids; use a guide built on the policy's tokenizer"
        )
    guide = disable_dropout(frozen_model(cfg, g.model, device))
    return TracesSampler(guide) if g.mode == "traces" else GuidedSampler(guide)
