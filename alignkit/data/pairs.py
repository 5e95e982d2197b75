"""Preference pairs from scored samples: the step rejection-sampling DPO (RS-DPO, Khaki et al. 2024),
iterative DPO and online DPO (Guo et al. 2024) share.

Every prompt has K sampled completions with scores (a reward set's totals, or a pairwise judge's win rates
from `round_robin_scores`). `build_pairs` turns a (P, K) score table into (chosen, rejected) pairs:

- ``best_worst``: one pair per prompt, its highest-scored completion against its lowest (iterative DPO,
  Xiong et al. 2024; online DPO with K = 2);
- ``all``: every (i, j) with s_i − s_j > min_gap (RS-DPO's reward-gap filter), largest gaps first when
  `max_pairs_per_prompt` caps them.

A pair is kept only when its gap exceeds `min_gap` (so ties, gap 0, are never trained on as wins), and never
when the two completions are the same token ids (a duplicate sample is not a preference). Ties in the
argmax / argmin go to the lowest index, so the pairs are a deterministic function of the table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignkit.config.preference import GAP_USES, PAIR_STRATEGIES


@dataclass(frozen=True)
class Pair:
    """Completions `chosen` and `rejected` (indices 0..K-1 within prompt `prompt`) and their score gap."""

    prompt: int
    chosen: int
    rejected: int
    gap: float


@dataclass
class PairStats:
    """What happened to the candidate pairs of one table."""

    prompts: int = 0
    pairs: int = 0
    below_gap: int = 0
    """Candidate pairs dropped because their gap did not exceed min_gap (ties included)."""
    duplicates: int = 0
    """Candidate pairs dropped because both completions are the same token ids."""
    gap_mean: float | None = None
    """The kept pairs' mean score gap (None when no pair was kept)."""

    def as_dict(self) -> dict[str, float]:
        return {f"pairs/{k}": float(v) for k, v in vars(self).items() if v is not None}


def sum_pair_stats(parts: list[PairStats]) -> PairStats:
    """The statistics of several tables taken as one (e.g. every process's share of a step): the counts
    summed, `gap_mean` the mean gap over every kept pair (each part's weighted by its pairs)."""
    total = PairStats(
        prompts=sum(p.prompts for p in parts),
        pairs=sum(p.pairs for p in parts),
        below_gap=sum(p.below_gap for p in parts),
        duplicates=sum(p.duplicates for p in parts),
    )
    if total.pairs:
        total.gap_mean = sum(p.gap_mean * p.pairs for p in parts if p.pairs) / total.pairs
    return total


def build_pairs(
    scores: torch.Tensor,
    *,
    strategy: str = "best_worst",
    min_gap: float = 0.0,
    max_pairs_per_prompt: int = 0,
    completions: list[list[list[int]]] | None = None,
) -> tuple[list[Pair], PairStats]:
    """(pairs, stats) from `scores` (P, K): row p holds the scores of prompt p's K completions.

    strategy: best_worst or all (see the module docstring); min_gap: a pair needs s_chosen − s_rejected
    > min_gap; max_pairs_per_prompt (all only): keep at most this many pairs of a prompt, the largest gaps
    (0 = no cap); completions: the (P, K) token ids, to drop pairs of identical completions.
    Pairs come prompt by prompt; within a prompt in the order the strategy finds them. A NaN score (a
    completion no reward source scored) is in no pair.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy '{strategy}' (expected one of {', '.join(PAIR_STRATEGIES)})")
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (prompts, K >= 2), got shape {tuple(scores.shape)}")
    table = scores.double().tolist()
    pairs: list[Pair] = []
    stats = PairStats(prompts=len(table))
    for p, row in enumerate(table):
        if strategy == "best_worst":
            scored = [i for i in range(len(row)) if not math.isnan(row[i])]  # NaN: no source's opinion
            if len(scored) < 2:
                stats.below_gap += 1
                continue
            best = max(scored, key=lambda i: (row[i], -i))  # ties: the lowest index
            worst = min(scored, key=lambda i: (row[i], i))
            candidates = [(best, worst)]
        else:
            candidates = [(i, j) for i in range(len(row)) for j in range(len(row)) if row[i] > row[j]]
            candidates.sort(key=lambda c: -(row[c[0]] - row[c[1]]))  # stable: ties keep (i, j) order
        kept = []
        for i, j in candidates:
            gap = row[i] - row[j]
            if not gap > min_gap:
                stats.below_gap += 1
            elif completions is not None and completions[p][i] == completions[p][j]:
                stats.duplicates += 1
            elif strategy == "all" and 0 < max_pairs_per_prompt <= len(kept):
                break
            else:
                kept.append(Pair(p, i, j, gap))
        pairs.extend(kept)
    stats.pairs = len(pairs)
    if pairs:
        stats.gap_mean = sum(p.gap for p in pairs) / len(pairs)
    return pairs, stats


def pair_columns(gap: float, gap_as: str, temperature: float = 1.0) -> dict[str, float]:
    """The per-row columns a pair with score gap `gap` carries into the loss: none (a hard label),
    margin (the sigmoid loss's margin: −log σ(β·Δlogratio − gap)) or soft_label (the Bradley-Terry
    probability σ(gap / temperature) that chosen is better, as the preference label)."""
    if gap_as == "none":
        return {}
    if gap_as == "margin":
        return {"margin": float(gap)}
    if gap_as == "soft_label":
        return {"preference": 1.0 / (1.0 + math.exp(-gap / temperature))}
    raise ValueError(f"unknown gap_as '{gap_as}' (expected one of {', '.join(GAP_USES)})")
