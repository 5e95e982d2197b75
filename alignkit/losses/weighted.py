"""Offline RL from logged rewards: row weights and the weighted NLL (`alignkit offline-rl`).

Rows are (prompt x, response y, reward r), logged by some earlier policy. Two ways to learn from them:

- Advantage-weighted regression (AWR, Peng et al. 2019; reward-weighted regression, Peters & Schaal
  2007): maximise Σ_i w_i·log π(y_i | x_i) with w_i = exp(A_i / τ), A_i = r_i − b_i. It is the
  projection onto π of the KL-regularised optimum π*(y|x) ∝ π_data(y|x)·exp(A/τ). Weights are clipped at
  `max_weight` (AWR's clip, before normalising) and self-normalised over the *training set*,
  w̃_i = w_i / mean_j w_j: computed once from the rewards before training, a row's weight does not depend
  on which batch, micro-batch or process it lands in, so the loss does not depend on how a step is split
  (a per-batch normalisation would reweight a row by its batch-mates). Normalising to mean 1 makes the
  loss a weighted SFT loss on SFT's scale: τ → ∞ gives SFT exactly.
- RAFT (reward-ranked fine-tuning, Dong et al. 2023): keep the top `top_fraction` of rows by reward, per
  prompt or over all rows, and fine-tune on them (weight 1, the rest dropped).

The baseline b_i: `mean` (the mean reward over the training rows), `prompt` (the mean reward of the rows
with the same prompt, when that prompt has two or more responses; rows of a prompt logged once fall back
to the global mean, since their own mean would make A = 0), or `none` (b = 0).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from alignkit.config.supervised import AWR_BASELINES

__all__ = [
    "advantages",
    "awr_weights",
    "effective_sample_size",
    "raft_keep",
    "weighted_nll",
]


def advantages(rewards: torch.Tensor, groups: Sequence[Hashable], baseline: str = "mean") -> torch.Tensor:
    """A_i = r_i − b_i for (N,) rewards; groups[i] identifies row i's prompt (module docstring for b)."""
    if baseline not in AWR_BASELINES:
        raise ValueError(f"baseline '{baseline}' is not one of {', '.join(AWR_BASELINES)}")
    rewards = rewards.double()
    if baseline == "none":
        return rewards.clone()
    base = torch.full_like(rewards, float(rewards.mean()))
    if baseline == "prompt":
        members: dict[Hashable, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        for rows in members.values():
            if len(rows) > 1:
                base[rows] = rewards[rows].mean()
    return rewards - base


def awr_weights(advantages: torch.Tensor, temperature: float, max_weight: float) -> torch.Tensor:
    """(N,) weights w̃_i = w_i / mean_j w_j, w_i = min(exp(A_i / τ), max_weight), in float64.

    Worked example (tests/test_offline_rl.py): rewards (1, 0, 2, −1), baseline mean 0.5, so
    A = (0.5, −0.5, 1.5, −1.5); τ = 1 and max_weight = e give w = (e^0.5, e^−0.5, e (clipped from e^1.5),
    e^−1.5) = (1.6487, 0.6065, 2.7183, 0.2231), mean 1.2992, so w̃ = (1.2691, 0.4669, 2.0923, 0.1718).
    The exponent is clipped before `exp`, so a large A / τ cannot overflow.
    """
    if temperature <= 0 or max_weight <= 0:
        raise ValueError(f"temperature and max_weight must be > 0, got {temperature} and {max_weight}")
    w = torch.exp(torch.clamp(advantages.double() / temperature, max=math.log(max_weight)))
    return w / w.mean()


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size (Σ w)² / Σ w² of (N,) weights: N for equal weights, 1 when one row
    holds all the weight."""
    w = weights.double()
    return float(w.sum() ** 2 / (w * w).sum())


def raft_keep(rewards: Sequence[float], groups: Sequence[Hashable], top_fraction: float) -> list[int]:
    """Indices (ascending) of the rows RAFT keeps: in each group (one group per prompt, or a single group
    for all rows), the ceil(top_fraction·n) rows with the highest reward, at least one. Ties are broken
    by position (the earlier row is kept), so exactly that many rows are kept from every group."""
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    kept = []
    for rows in members.values():
        k = max(1, math.ceil(top_fraction * len(rows) - 1e-9))
        kept += sorted(rows, key=lambda i: (-rewards[i], i))[:k]
    return sorted(kept)


def weighted_nll(
    logps: torch.Tensor,
    weights: torch.Tensor,
    tokens: torch.Tensor,
    kl: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """The micro-batch loss (Σ_i w_i·(−log π(y_i|x_i)) + β·Σ_i KL_i) / Σ_i n_i: a mean over completion
    tokens (`optimizer_step` weights it by them, so a step's loss is Σ over its rows / Σ of its tokens).

    logps, kl: (B,) the policy's log-prob sums and per-token KL(π ‖ π_ref) sums over each row's
    completion tokens; weights: (B,) the rows' w̃ (1 for RAFT); tokens: (B,) their completion tokens n_i.
    """
    loss = -(weights * logps).sum()
    if kl is not None and kl_coef > 0:
        loss = loss + kl_coef * kl.sum()
    return loss / tokens.sum().clamp(min=1)
