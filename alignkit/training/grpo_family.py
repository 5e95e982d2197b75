"""The parts of a GRPO step that DAPO, GDPO and high-entropy-token training change, between the rollout and the
updates (`algorithms/grpo.py` calls them; the maths is in `losses.group_rewards` and
`losses.entropy_tokens`):

    terms = RewardTerms.of(cfg, rewards)          # what the advantages see: the reward (+ overlong penalty),
    advantages = terms.advantages(rollout, ...)   # or every source apart (multi_reward=normalize_then_sum)
    mask, record = high_entropy_tokens(entropy, loss_mask, fraction, gather=run.gather)

Every statistic is the whole step's: rewards, entropies and counts are gathered over the processes first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.losses.entropy_tokens import entropy_threshold, high_entropy_mask
from alignkit.losses.group_rewards import normalize_then_sum, overlong_penalty
from alignkit.rollout import Rollout

__all__ = ["RewardTerms", "high_entropy_tokens"]


@dataclass(frozen=True)
class RewardTerms:
    """The rewards a GRPO step's advantages are computed from (docs/online_rl.md, *The GRPO family*).

    multi_reward=sum: one column, the reward set's total (weighted, normalised, clipped as it says) plus
    overlong_weight x DAPO's overlong penalty. multi_reward=normalize_then_sum: one column per reward source,
    its raw scores, then the overlong penalty as one more term, each with its weight (`weights`)."""

    mode: str
    """sum or normalize_then_sum (GRPOConfig.multi_reward)."""
    weights: dict[str, float]
    """The reward sources' weights, by name (RewardSet.weights)."""
    max_length: int
    """L_max of the overlong penalty: generation.max_new_tokens."""
    overlong_cache: int = 0
    """L_cache (0: no overlong penalty)."""
    overlong_weight: float = 1.0

    @classmethod
    def of(cls, cfg, rewards) -> RewardTerms:
        """The terms of a resolved GRPOConfig and its RewardSet."""
        return cls(
            cfg.multi_reward,
            dict(rewards.weights),
            cfg.generation.max_new_tokens,
            cfg.overlong_cache,
            cfg.overlong_weight,
        )

    def overlong(self, rollout: Rollout) -> torch.Tensor | None:
        """(N,) DAPO's overlong penalty of each completion, unweighted; None when off."""
        if not self.overlong_cache:
            return None
        lengths = torch.tensor(rollout.completion_lengths)
        return overlong_penalty(lengths, max_length=self.max_length, cache=self.overlong_cache)

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        """(N,) rewards (sum) or (N, K) reward terms (normalize_then_sum) of this process's rollout, before
        any KL penalty: what dynamic sampling tests for unanimous groups and the advantages see."""
        penalty = self.overlong(rollout)
        if self.mode == "sum":
            return rollout.scores if penalty is None else rollout.scores + self.overlong_weight * penalty
        columns = [rollout.source_scores[name].float() for name in self.weights]
        return torch.stack(columns if penalty is None else [*columns, penalty], dim=-1)

    def term_weights(self) -> torch.Tensor:
        """(K,) the weight of each column of a normalize_then_sum `__call__`."""
        weights = list(self.weights.values()) + ([self.overlong_weight] if self.overlong_cache else [])
        return torch.tensor(weights, dtype=torch.float64)

    def metrics(self, rollout: Rollout, *, gather: Callable | None = None) -> dict[str, float]:
        """`overlong/penalty_mean` (the mean unweighted penalty per completion) and `overlong/frac_penalised`
        (the share of completions with a penalty), over every process; {} when off."""
        penalty = self.overlong(rollout)
        if penalty is None:
            return {}
        penalty = (gather or (lambda x: x))(penalty)
        return {
            "overlong/penalty_mean": float(penalty.mean()),
            "overlong/frac_penalised": float((penalty < 0).float().mean()),
        }

    def gdpo_advantages(self, terms: torch.Tensor, group_size: int) -> torch.Tensor:
        """GDPO's advantages of every process's (N·W, K) terms (`losses.group_rewards.normalize_then_sum`)."""
        return normalize_then_sum(terms, self.term_weights(), group_size)


def high_entropy_tokens(
    entropy: torch.Tensor, loss_mask: torch.Tensor, fraction: float, *, gather: Callable | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """((N, T) 0/1 mask of the tokens the policy loss keeps, metrics): the top `fraction` of the step's
    counted tokens (`loss_mask`, every process's: `gather`) by the sampling policy's `entropy` (N, T), with
    one threshold for the whole step (`losses.entropy_tokens`). Metrics: `entropy_tokens/threshold` (τ, in
    nats) and `entropy_tokens/frac_kept` (the share of counted tokens kept: the fraction, or more on ties)."""
    gather = gather or (lambda x: x)
    counted = loss_mask.bool()
    threshold = entropy_threshold(gather(entropy[counted].float()), fraction)
    mask = high_entropy_mask(entropy, loss_mask, threshold)
    kept, total = gather(mask.sum().reshape(1)).sum(), gather(counted.sum().reshape(1)).sum()
    return mask, {
        "entropy_tokens/threshold": float(threshold),
        "entropy_tokens/frac_kept": float(kept / total.clamp(min=1)),
    }
