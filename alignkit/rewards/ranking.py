"""A pairwise judge as a reward: each completion's score is its round-robin win rate against the other
completions of its prompt (iterative-dpo and online-dpo rank with it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def round_robin_scores(
    compare: Callable[[list[str], list[str], list[str]], torch.Tensor],
    prompts: list[str],
    completions: list[list[str]],
) -> torch.Tensor:
    """(P, K) scores from a pairwise judge: each completion's mean probability of beating the other K−1
    completions of its prompt (a Borda count over a round robin), so that `build_pairs` reads a pairwise
    judge's verdicts the way it reads rewards.

    compare(prompts, a, b) -> (n,) P(a better than b) (`JudgeReward.compare`, which asks both orders); it is
    called once, with all K(K−1)/2 pairs of every prompt. P(b beats a) is taken as 1 − P(a beats b).
    """
    K = len(completions[0]) if completions else 0
    if any(len(c) != K for c in completions) or K < 2:
        raise ValueError("every prompt needs the same number (>= 2) of completions")
    index = [(p, i, j) for p in range(len(prompts)) for i in range(K) for j in range(i + 1, K)]
    wins = compare(
        [prompts[p] for p, _, _ in index],
        [completions[p][i] for p, i, _ in index],
        [completions[p][j] for p, _, j in index],
    ).double()
    scores = torch.zeros(len(prompts), K, dtype=torch.float64)
    for (p, i, j), w in zip(index, wins.tolist()):
        scores[p, i] += w
        scores[p, j] += 1.0 - w
    return scores / (K - 1)


class JudgeRanking:
    """A pairwise judge where a reward set is expected by `rollout.collect`: the completions come prompt-major in
    groups of `group_size`, and each one's score is its round-robin win rate within its group
    (`round_robin_scores`). Per-row scores exist only relative to the group, so it cannot score lone
    completions (evaluation needs a pointwise reward)."""

    def __init__(self, judge, group_size: int):
        self.judge, self.group_size = judge, group_size

    def __call__(
        self, prompts: list[str], responses: list[str], update: bool = True, gather=None, *, context=None
    ):
        """Round-robin win rates of each group's completions (no running statistics: `update` and
        `gather`, a reward set's, change nothing; a pairwise judge reads no row columns: `context` neither)."""
        from alignkit.rewards.compose import RewardOutput, describe_scores

        K = self.group_size
        if len(responses) % K:
            raise ValueError(f"{len(responses)} completions do not split into groups of {K}")
        groups = [responses[g : g + K] for g in range(0, len(responses), K)]
        total = round_robin_scores(self.judge.compare, prompts[::K], groups).flatten().float()
        metrics = self.judge.metrics()
        stats = {
            **describe_scores(total, "judge_win_rate"),
            **{f"judge/{k}": float(v) for k, v in metrics.items()},
        }
        return RewardOutput(total, {"judge_win_rate": total}, stats=stats, metrics={"judge": metrics})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
