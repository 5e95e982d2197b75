"""A policy's reward on held-out prompts during training: one sample per prompt, fixed seed, the reward
normaliser untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from alignkit.data.prompts import Prompts
from alignkit.rewards import RewardSet
from alignkit.rewards.compose import weighted_sum
from alignkit.rollout import collect


def evaluate_policy(
    model, tokenizer, prompts: Prompts, rewards: RewardSet, *, sampling, seed: int, sampler=None
) -> dict:
    """One sample per eval prompt from `model` (the unwrapped policy), the same seed every time and the
    reward normaliser left as it is: mean reward (total and per source) and completion length. `sampler`
    draws them as it draws the run's rollouts (`OnlineRun.synced`; default: `model` on the sampling backend).

    With `reward_normalize` the eval reward is the weighted sum of the sources' raw scores (unclipped: the
    clip bounds normalised values), not the reward training uses: normalised by the moving training
    statistics, the same completions would score differently at every eval."""
    rollout = collect(
        model,
        tokenizer,
        prompts.eval_ids,
        [r.reward_input for r in prompts.eval_rows],
        rewards=rewards,
        group_size=1,
        sampling=sampling,
        seed=seed,
        update_rewards=False,
        sampler=sampler,
        columns=[r.columns for r in prompts.eval_rows],
        origins=[r.origin for r in prompts.eval_rows],
    )
    total = weighted_sum(rollout.source_scores, rewards.weights) if rewards.normalize else rollout.scores
    out = {  # (means over the scored completions: a NaN is one no source scored)
        "reward": float(total.nanmean()),
        "completion_length": sum(rollout.completion_lengths) / len(rollout.completion_lengths),
    }
    out.update({f"rewards/{n}/mean": float(v.nanmean()) for n, v in rollout.source_scores.items()})
    return out


def run_evaluator(
    run, current_policy: Callable, tokenizer, prompts: Prompts, rewards: RewardSet, *, sampling
):
    """An online run's `evaluate()`: `evaluate_policy` of the policy as it is when called (`current_policy()`,
    the unwrapped model), seeded with the run's seed + 1 every time, drawn by the run's sampler synced to it
    (`OnlineRun.synced`)."""

    def evaluate() -> dict:
        model = current_policy()
        seed = run.cfg.seed + 1
        return evaluate_policy(
            model, tokenizer, prompts, rewards, sampling=sampling, seed=seed, sampler=run.synced(model)
        )

    return evaluate
