"""The `guide:` section of grpo, rloo and ppo: a frozen guide policy that steers what the policy samples, the
update corrected for it (docs/online_rl.md, *Guided rollouts*).

    alignkit grpo model=PATH guide.model=ALIGNED guide.alpha=0.5 guide.schedule=linear guide.steps=100 ...

Off unless `guide.model` is set. `mixture` draws every token of a rollout from q = α·π + (1 − α)·g (MiniLLM's
teacher-mixed sampling); the sampler reports log q, so the sampler correction weights each token by
π_old / q ≤ 1/α. `traces` (grpo and rloo) puts k = `guide.traces` whole completions of the guide into each
group of G (LUFFY's mixed-policy GRPO), trained on by policy shaping (`losses.policy_shaping`). The checks that
need other sections (the backend, the correction's cap, G) are `relations` of the command configs
(`guide_relations`, `guide_traces_relations`); the tokenizer check needs the tokenizers and runs when they load.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from alignkit.config.load import above, at_least, between

GUIDE_SCHEDULES = ("constant", "linear")
GUIDE_MODES = ("mixture", "traces")


@dataclass
class GuideSettings:
    """A frozen guide policy mixed into the rollouts, or writing some of them (off while `model` is empty)."""

    model: str = ""
    """The guide: a causal LM (hub name or folder) sharing the policy's tokenizer, e.g. an aligned model;
    "" = no guide. Frozen: never trained, never in a checkpoint (a resumed run loads it again)."""
    alpha: float = 1.0
    """mode=mixture: α, the policy's weight: rollouts are drawn from q = α·π + (1 − α)·g, so the importance
    weights π/q are at most 1/α (1 = the guide is off)."""
    schedule: str = "constant"
    """How α (mixture) or k (traces) moves: constant, or linear (α up to 1, k down to 0, over guide.steps
    steps, then the guide is off and the run is the unguided one)."""
    steps: int = 0
    """schedule=linear: the steps over which α reaches 1, or k 0 (0 = the whole run)."""
    mode: str = "mixture"
    """mixture: every token drawn from q, both models stepping their KV caches together (the loop sampler
    only); traces: k = guide.traces of each prompt's G completions written by the guide alone (grpo, rloo)."""
    traces: int = 1
    """mode=traces: k, the guide's completions in each group of G (0 < k < G); schedule=linear fades k to 0
    over guide.steps steps."""
    gamma: float = 0.1
    """mode=traces: γ of LUFFY's policy shaping, each guide token's objective f(π) = π / (π + γ) in place of
    the importance ratio (0.1: the paper's)."""

    ranges: ClassVar[dict] = {
        "alpha": between(0, 1, low_open=True),
        "schedule": GUIDE_SCHEDULES,
        "steps": at_least(0),
        "mode": GUIDE_MODES,
        "traces": at_least(1),
        "gamma": above(0),
    }

    def alpha_at(self, step: int, total_steps: int) -> float:
        """α for the rollout of step `step` (0 = the first) of a run of `total_steps`: 1 without a guide;
        guide.alpha throughout (constant); or linear, α_s = α + (1 − α)·s / N with N = guide.steps (0: the run's
        total_steps), exactly 1 from step N on."""
        if not self.model:
            return 1.0
        span = self.steps or total_steps
        if self.schedule == "constant":
            return self.alpha
        if step >= span:
            return 1.0
        return self.alpha + (1 - self.alpha) * step / span

    def traces_at(self, step: int, total_steps: int) -> int:
        """k for the rollout of step `step` of a run of `total_steps` (mode=traces): 0 without a guide;
        guide.traces throughout (constant); or linear, k_s = ⌈k·(N − s) / N⌉ with N = guide.steps (0: the run's
        total_steps): k at the start, never 0 before step N, 0 from step N on (the unguided run)."""
        if not self.model or self.mode != "traces":
            return 0
        span = self.steps or total_steps
        if self.schedule == "constant":
            return self.traces
        if step >= span:
            return 0
        return -(-self.traces * (span - step) // span)

    def check(self) -> str | None:
        """The section's own contradiction, or None: a setting without effect."""
        if not self.model:
            for f in fields(self):
                if getattr(self, f.name) != f.default:
                    return (
                        f"guide.{f.name}={getattr(self, f.name)} has no effect without guide.model (no guide is "
                        "loaded); set guide.model=<hub name or folder> or remove it"
                    )
            return None
        if self.schedule == "constant" and self.steps:
            return f"guide.steps={self.steps} is used by guide.schedule=linear only"
        if self.mode == "traces":
            if self.alpha != 1:
                return (
                    f"guide.alpha={self.alpha:g} is the mixture's weight (guide.mode=mixture); guide.mode=traces "
                    "puts guide.traces whole guide completions in each group instead: set guide.traces, and "
                    "guide.schedule=linear to fade them out"
                )
            return None
        for name in ("traces", "gamma"):
            if getattr(self, name) != getattr(GuideSettings, name):
                return f"guide.{name}={getattr(self, name)} is used by guide.mode=traces only"
        if self.schedule == "linear" and self.alpha == 1:
            return "guide.schedule=linear has no effect at guide.alpha=1 (α is 1 throughout: no guidance)"
        return None

    relations: ClassVar[tuple] = (lambda g: g.check(),)


def guide_relations(cfg) -> str | None:
    """A `relations` check of a command with a `guide:` section: what the guide cannot run with.

    - mixture needs the loop sampler: both models decode in lockstep, each on its own KV cache; neither vLLM
      nor transformers' generate can step a second model's cache beside the first.
    - the sampler correction must leave the weights π/q ≤ 1/α whole: a cap C below 1/α truncates or masks
      exactly the tokens the guide made rarer than the policy would have, which biases the update toward the
      guide; a sequence-level mode caps a product of up to max_new_tokens such ratios, which no cap short of
      α^-max_new_tokens leaves whole, so it is refused (auto picks token_truncate for a guided rollout).
    """
    g = cfg.guide
    if not g.model or not 0 < g.alpha <= 1:  # (an alpha out of range is the range check's to report)
        return None
    if g.mode == "mixture" and cfg.generation.backend in ("vllm", "hf"):
        return (
            f"guide.mode=mixture cannot run with generation.backend={cfg.generation.backend}: every token is drawn "
            "from the mixture of the policy and the guide, both models stepping their KV caches together, which "
            "only the loop sampler does; use generation.backend=loop (or auto)"
        )
    mode, cap = cfg.sampler_correction, cfg.sampler_correction_cap
    if g.mode != "mixture":
        return None
    if mode.startswith("sequence_"):
        return (
            f"sampler_correction={mode} with a guide: one weight per completion is the product of its tokens' "
            f"ratios π/q, each up to 1/guide.alpha, so any cap below (1/α)^max_new_tokens truncates or masks "
            "whole completions and biases the update toward the guide; use token_truncate (what auto picks), "
            "token_mask or none"
        )
    if mode in ("auto", "token_truncate", "token_mask") and cap < 1 / g.alpha * (1 - 1e-9):
        return (
            f"sampler_correction_cap={cap:g} is below 1/guide.alpha = {1 / g.alpha:g}: a guided token's weight "
            f"π/q reaches 1/α, and a cap under it would {'mask' if mode == 'token_mask' else 'truncate'} exactly "
            "the tokens the policy favours over the guide, biasing the update toward the guide; set "
            f"sampler_correction_cap >= {1 / g.alpha:g}"
        )
    return None


def guide_traces_relations(cfg) -> str | None:
    """A `relations` check of the GRPO family: guide.traces = k must leave the policy completions of its own in
    each group of G = num_generations (0 < k < G), so that the group's advantages compare the guide's traces
    with the policy's samples and the on-policy part of the update has samples to train on."""
    g = cfg.guide
    if not g.model or g.mode != "traces" or g.traces < 1:  # (k < 1 is the range check's to report)
        return None
    G = cfg.num_generations
    if g.traces >= G:
        return (
            f"guide.traces={g.traces} of num_generations={G}: each group of G completions holds the guide's k "
            f"traces and G - k of the policy's own, so k must be below G (LUFFY: 1 of 8), or no completion of "
            f"the policy would be left to compare them with; lower guide.traces or raise num_generations"
        )
    return None
