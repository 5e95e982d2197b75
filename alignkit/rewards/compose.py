"""Combining reward sources into one reward: weighted sums, normalise-then-sum, clipping, constraint costs.

For reward sources i with scores s_i (B,) and weights w_i, the total reward is

    r = clip( Σ_i w_i · n_i(s_i) )        n_i(s) = (s - μ_i) / sqrt(σ_i² + ε)  when normalising, else s

where μ_i, σ_i² are running statistics of source i over every batch seen so far (this one included),
so that sources on different scales (a logit, a 1-5 judge score, a [-1, 1] lexicon score) contribute
in proportion to their weights rather than their units; `clip` bounds |r| (outliers from a reward
model destabilise PPO). The running statistics are state: save them with the checkpoint
(`state_dict`) and load them on resume, or scores would be normalised differently after a restart.
With several processes each scores its own share of a batch; `gather` hands the normaliser every
process's scores, so every process keeps the same statistics (those of the whole batch) and the one
checkpointed is everyone's.

A score of NaN is a source's *no opinion* on that response (a Python reward returning None, as in TRL): the
sum leaves the term out (a nan-sum: the other sources keep their weights, nothing is renormalised), the
normaliser does not see it, and a response no source scored has a NaN total, which the advantage estimators
treat as "no reward" (advantage 0, out of its group's baseline; `losses.policy`).

Constraint costs (sources with `cost_threshold`) are not summed into r: each is returned with a
`violated` flag (cost > threshold), for a constrained method (e.g. a Lagrangian as in Safe RLHF,
Dai et al. 2023) or a filter to act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.config.load import ConfigError
from alignkit.config.online import OnlineConfig
from alignkit.rewards.base import (
    Prompt,
    RewardSource,
    RowMean,
    ScoreContext,
    check_batch,
    score_source,
    source_columns,
)
from alignkit.rewards.registry import build_rewards


def weighted_sum(scores: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_i w_i s_i over the sources named in `weights`; every s_i is (B,), as is the result. A NaN s_i (no
    opinion) is left out of its row's sum; a row where every source is NaN is NaN."""
    if not weights:
        raise ValueError("weighted_sum of no sources")
    terms = torch.stack([w * scores[name].float() for name, w in weights.items()])  # (S, B)
    unscored = terms.isnan().all(0)
    return torch.where(unscored, torch.nan, terms.nan_to_num(nan=0.0).sum(0))


def clip(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """`x` clamped to [-limit, limit]; unchanged when limit is None."""
    return x if limit is None else x.clamp(-limit, limit)


def constraint(cost: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cost, violated) where violated = cost > threshold, (B,) bool: a cost must stay at or under it."""
    return cost, cost > threshold


class RunningMeanStd:
    """Mean and (population) variance of every value seen, updated batch by batch, in float64.

    Merges a batch (n_b, μ_b, M2_b) into the running (n, μ, M2) with Chan et al.'s parallel update:
    δ = μ_b - μ; μ += δ n_b / (n + n_b); M2 += M2_b + δ² n n_b / (n + n_b); σ² = M2 / n.
    The result does not depend on how the values were split into batches.
    """

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Adds the values of `x` (NaNs, a source's no opinion, are left out)."""
        x = x.detach().double().reshape(-1).cpu()
        x = x[~x.isnan()]
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return self.var**0.5

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - μ) / sqrt(σ² + ε), in x's dtype."""
        return ((x.double() - self.mean) / (self.var + self.eps) ** 0.5).to(x.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class RewardOutput:
    """What a RewardSet returns for one batch."""

    total: torch.Tensor
    """(B,) the reward: weighted sum of the (normalised) reward sources, clipped."""
    scores: dict[str, torch.Tensor]
    """Raw (B,) scores of every source, costs included, before normalisation: for logging and output."""
    costs: dict[str, torch.Tensor] = field(default_factory=dict)
    """(B,) cost of each constraint source."""
    violated: dict[str, torch.Tensor] = field(default_factory=dict)
    """(B,) bool: the cost is over its threshold."""
    stats: dict[str, float] = field(default_factory=dict)
    """Per-source statistics of this batch and the sources' counters, as 'name/stat': value."""
    metrics: dict[str, dict[str, float | RowMean]] = field(default_factory=dict)
    """Every source's own `metrics()` as it returned them, by source name (`RowMean`s kept), for
    `base.reduce_metrics` over processes."""


def describe_scores(x: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean, std, min and max of the scores in `x` (NaNs, no opinion, left out; their share as `/none` when
    there are some)."""
    x = x.float()
    scored = x[~x.isnan()]
    none = {f"{prefix}/none": float(1 - scored.numel() / x.numel())} if scored.numel() < x.numel() else {}
    x = scored
    if x.numel() == 0:
        return none
    return {
        **none,
        f"{prefix}/mean": float(x.mean()),
        f"{prefix}/std": float(x.std(unbiased=False)),
        f"{prefix}/min": float(x.min()),
        f"{prefix}/max": float(x.max()),
    }


class RewardSet:
    """Reward sources scored together and composed (see the module docstring)."""

    def __init__(
        self,
        sources: list[RewardSource],
        cost_thresholds: dict[str, float] | None = None,
        normalize: bool = False,
        clip: float | None = None,
        *,
        eps: float = 1e-8,
    ):
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"reward sources need distinct names, got {names}")
        self.sources = sources
        self.cost_thresholds = dict(cost_thresholds or {})
        unknown = set(self.cost_thresholds) - set(names)
        if unknown:
            raise ValueError(f"cost thresholds for unknown sources {sorted(unknown)} (sources: {names})")
        self.weights = {s.name: s.weight for s in sources if s.name not in self.cost_thresholds}
        if not self.weights:
            raise ValueError("every source is a constraint cost: at least one must be a reward term")
        self.normalize, self.clip = normalize, clip
        self.stats = {name: RunningMeanStd(eps) for name in self.weights}

    @classmethod
    def from_specs(cls, specs: list[dict], normalize: bool = False, clip: float | None = None) -> RewardSet:
        """Builds the sources from config dicts (`build_rewards`); `cost_threshold` keys make costs."""
        sources = build_rewards(specs)
        thresholds = {
            s.name: s.options.cost_threshold for s in sources if s.options.cost_threshold is not None
        }
        return cls(sources, thresholds, normalize, clip)

    def __call__(
        self,
        prompts: list[Prompt],
        responses: list[str],
        update: bool = True,
        gather=None,
        *,
        context: ScoreContext | None = None,
    ) -> RewardOutput:
        """Scores a batch with every source and composes them; `update=False` freezes the normaliser
        (`gather`: see `compose`; `context`: see `score_sources`)."""
        return self.compose(self.score_sources(prompts, responses, context), update, gather)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every row column some source reads, in the order the sources name them."""
        names = (c for s in self.sources for c in (source_columns(s) or ()))
        return tuple(dict.fromkeys(names))

    def score_sources(
        self, prompts: list[Prompt], responses: list[str], context: ScoreContext | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw (B,) scores of every source, by name; a source that declares `columns` also gets its part of
        `context` (the row columns, token ids, groups and step of these responses; `rewards.base`)."""
        check_batch(prompts, responses)
        if context is not None and len(context) not in (0, len(responses)):
            raise ValueError(f"score context for {len(context)} responses, but {len(responses)} responses")
        return {s.name: score_source(s, prompts, responses, context) for s in self.sources}

    def compose(self, scores: dict[str, torch.Tensor], update: bool = True, gather=None) -> RewardOutput:
        """The total reward, costs and statistics from raw per-source scores (see the module docstring).

        With normalisation on, `update` first adds these scores to the running statistics: each source's
        `gather(scores)` ((B,) -> the (ΣB,) scores of every process, in rank order) when this process
        scores one share of a batch split over processes, else these scores.
        """
        terms = {}
        for name in self.weights:
            if self.normalize:
                if update:
                    self.stats[name].update(scores[name] if gather is None else gather(scores[name]))
                terms[name] = self.stats[name].normalize(scores[name])
            else:
                terms[name] = scores[name]
        total = clip(weighted_sum(terms, self.weights), self.clip)
        costs, violated, stats = {}, {}, {}
        metrics = {s.name: s.metrics() for s in self.sources}
        for name, threshold in self.cost_thresholds.items():
            costs[name], violated[name] = constraint(scores[name], threshold)
            if violated[name].numel():
                stats[f"{name}/violation_rate"] = float(violated[name].float().mean())
        for s in self.sources:
            stats.update(describe_scores(scores[s.name], s.name))
            stats.update({f"{s.name}/{k}": float(v) for k, v in metrics[s.name].items()})
        stats.update(describe_scores(total, "reward"))
        if self.clip is not None and total.numel():
            stats["reward/clip_fraction"] = float((total.abs() >= self.clip).float().mean())
        return RewardOutput(total, scores, costs, violated, stats, metrics)

    def state_dict(self) -> dict:
        """The normalisers' running statistics, per source."""
        return {name: rms.state_dict() for name, rms in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.stats) - set(state)
        if missing:
            raise ValueError(f"reward normaliser state lacks sources {sorted(missing)}")
        for name, rms in self.stats.items():
            rms.load_state_dict(state[name])


def online_rewards(cfg: OnlineConfig, command: str) -> RewardSet:
    """The config's reward set; sources with a constraint cost are refused (they would drop out of the
    total unseen: no online method trains against costs yet)."""
    rewards = RewardSet.from_specs(cfg.rewards, normalize=cfg.reward_normalize, clip=cfg.reward_clip)
    if rewards.cost_thresholds:
        raise ConfigError(
            f"rewards: {', '.join(rewards.cost_thresholds)} set cost_threshold, and {command} does not train "
            "against constraint costs yet; give the source a negative weight instead"
        )
    return rewards
