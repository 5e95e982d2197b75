"""A completion no reward source scored (NaN total: every source returned None) gets advantage 0 and stays out
of its group's baseline and of the batch statistics, in every estimator; PPO fills its score with the step's
mean scored score; pairs never hold it; the rollout's metrics are over scored completions. Numbers by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.data.pairs import build_pairs
from alignkit.evaluation.stats import compare_scores
from alignkit.losses.policy import compute_advantages, frac_reward_zero_std
from alignkit.losses.ppo import fill_unscored
from alignkit.rollout import importance_centred, rollout_metrics

nan = math.nan
# Two groups of G = 4: scored 1, 3, 5 and one unscored; a unanimous group of 2s.
REWARDS = torch.tensor([1.0, 3.0, nan, 5.0, 2.0, 2.0, 2.0, 2.0])


def test_grpo_leaves_the_unscored_out_of_the_group_mean_and_std():
    """Group 1's scored rewards 1, 3, 5: mean 3, unbiased std sqrt((4 + 0 + 4) / 2) = 2, so A = ∓2 / (2 + 1e-4)
    and 0 for the middle one; the unscored one gets 0; the unanimous group gets 0."""
    a = 2 / (2 + 1e-4)
    expected = [-a, 0.0, 0.0, a, 0.0, 0.0, 0.0, 0.0]
    assert compute_advantages("grpo", REWARDS, 4).tolist() == pytest.approx(expected, abs=1e-6)


def test_grpo_batch_scale_takes_the_std_of_the_scored_rewards_only():
    """The 7 scored rewards 1, 3, 5, 2, 2, 2, 2: mean 17/7, squared deviations (10/7)² + (4/7)² + (18/7)² +
    4·(3/7)² = (100 + 16 + 324 + 36)/49 = 476/49, unbiased variance 476/294, std 1.272418; A = ∓2 / (std + 1e-4)."""
    std = math.sqrt(476 / 294)
    a = 2 / (std + 1e-4)
    expected = [-a, 0.0, 0.0, a, 0.0, 0.0, 0.0, 0.0]
    assert compute_advantages("grpo", REWARDS, 4, scale="batch").tolist() == pytest.approx(expected, abs=1e-6)


def test_dr_grpo_centres_on_the_scored_mean():
    """r − mean of the scored (3): −2, 0, (unscored) 0, 2."""
    expected = [-2.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    assert compute_advantages("dr_grpo", REWARDS, 4).tolist() == pytest.approx(expected, abs=1e-6)


def test_rloo_baseline_is_the_other_scored_completions():
    """1 against (3 + 5)/2 = 4 -> −3; 3 against (1 + 5)/2 -> 0; 5 against (1 + 3)/2 -> 3 (= 3/2·(r − 3), the
    G/(G−1) rule with G = 3 scored); the unscored one 0. A lone scored completion has no baseline: 0."""
    expected = [-3.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    assert compute_advantages("rloo", REWARDS, 4).tolist() == pytest.approx(expected, abs=1e-6)
    lone = torch.tensor([nan, 4.0, nan, nan, 1.0, 2.0, 3.0, 4.0])
    assert compute_advantages("rloo", lone, 4)[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert compute_advantages("grpo", lone, 4)[:4].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_reinforce_pp_batch_statistics_are_over_the_scored():
    """Centred on the scored group mean: −2, 0, 2 and four 0s (mean 0 over the 7 scored), unbiased std
    sqrt(8/6); A = ∓2 / sqrt(4/3) = ∓sqrt(3), the unscored 0. With G = 1 the batch mean and std are of the
    scored: 1, 3 -> mean 2, std sqrt(2), A = ∓1/sqrt(2)."""
    r3 = math.sqrt(3)
    expected = [-r3, 0.0, 0.0, r3, 0.0, 0.0, 0.0, 0.0]
    assert compute_advantages("reinforce_pp", REWARDS, 4).tolist() == pytest.approx(expected, abs=1e-6)
    single = compute_advantages("reinforce_pp", torch.tensor([1.0, nan, 3.0]), 1)
    assert single.tolist() == pytest.approx([-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)], abs=1e-6)


def test_without_nans_the_estimators_are_unchanged():
    """Group [1, 3, 4, 5]: mean 13/4, GRPO's std sqrt(((9/4)² + (1/4)² + (3/4)² + (7/4)²)/3) = sqrt(35/12)."""
    r = torch.tensor([1.0, 3.0, 4.0, 5.0])
    std = math.sqrt(35 / 12)
    assert compute_advantages("grpo", r, 4).tolist() == pytest.approx(
        [(x - 3.25) / (std + 1e-4) for x in (1, 3, 4, 5)], abs=1e-6
    )
    assert compute_advantages("rloo", r, 4).tolist() == pytest.approx(
        [4 / 3 * (x - 3.25) for x in (1, 3, 4, 5)]
    )


def test_zero_std_groups_count_over_scored_rewards():
    """[1, 3, nan, 5] varies; [2, 2, nan, 2] is unanimous; [nan, 4, nan, nan] has one scored: 2 of 3."""
    r = torch.tensor([1.0, 3.0, nan, 5.0, 2.0, 2.0, nan, 2.0, nan, 4.0, nan, nan])
    assert float(frac_reward_zero_std(r, 4)) == pytest.approx(2 / 3)


def test_ppo_fills_an_unscored_score_with_the_steps_scored_mean():
    """[1, nan, 3] -> mean 2 fills it; with another process holding [5, nan], the step's mean (1 + 3 + 5)/3 = 3;
    a step with nothing scored fills 0."""
    assert fill_unscored(torch.tensor([1.0, nan, 3.0])).tolist() == [1.0, 2.0, 3.0]
    both = lambda x: torch.cat([x, torch.tensor([5.0, nan])])  # noqa: E731  (rank 0 first, as gathered)
    assert fill_unscored(torch.tensor([1.0, nan, 3.0]), both).tolist() == [1.0, 3.0, 3.0]
    assert fill_unscored(torch.tensor([nan, nan])).tolist() == [0.0, 0.0]


def test_pairs_never_hold_an_unscored_completion():
    """best_worst of [1, nan, 3, 0]: best 3 (index 2), worst 0 (index 3), gap 3; a prompt with one scored
    completion gives no pair."""
    pairs, stats = build_pairs(torch.tensor([[1.0, nan, 3.0, 0.0], [nan, 1.0, nan, nan]]))
    assert [(p.prompt, p.chosen, p.rejected, p.gap) for p in pairs] == [(0, 2, 3, 3.0)]
    assert stats.pairs == 1
    pairs, _ = build_pairs(torch.tensor([[1.0, nan, 3.0]]), strategy="all")
    assert [(p.chosen, p.rejected) for p in pairs] == [(2, 0)]


def test_rollout_metrics_are_over_scored_completions():
    """Scores [1, nan, 3, nan]: reward 2, std 1, frac_unscored 0.5; the source's mean over its scored, /none 0.5."""
    scores = torch.tensor([1.0, nan, 3.0, nan])
    rollout = SimpleNamespace(
        scores=scores,
        completion_lengths=[2, 2, 2, 2],
        ended=torch.tensor([True] * 4),
        group_size=2,
        source_scores={"f": scores},
        source_metrics={"f": {}},
    )
    out = rollout_metrics(rollout)
    assert out["reward"] == 2.0 and out["reward_std"] == 1.0 and out["frac_unscored"] == 0.5
    assert out["rewards/f/mean"] == 2.0 and out["rewards/f/none"] == 0.5
    assert out["frac_reward_zero_std"] == 1.0  # each group has one scored completion


def test_eval_statistics_are_over_scored_samples():
    """2 prompts x 2 samples. base [1, nan, 3, 5], aligned [2, 4, nan, nan]: base mean (1+3+5)/3 = 3, per-prompt
    means 1 and 4; aligned mean 3, prompt 2 unscored (left out: no stderr from one prompt); the paired
    differences where both scored: 2 - 1 = 1 only; win rate over prompt 1 alone: 2 > 1 -> 1.0."""
    base = torch.tensor([1.0, nan, 3.0, 5.0])
    aligned = torch.tensor([2.0, 4.0, nan, nan])
    out = compare_scores(base, aligned, 2)
    assert out["base"]["mean"] == 3.0 and out["base"]["unscored"] == 0.25
    assert out["base"]["stderr"] == pytest.approx(
        math.sqrt(((1 - 2.5) ** 2 + (4 - 2.5) ** 2) / 1) / math.sqrt(2)
    )
    assert out["aligned"]["mean"] == 3.0 and out["aligned"]["stderr"] is None
    assert out["difference"] == 1.0 and out["win_rate"] == 1.0


def test_a_guided_rollouts_baseline_leaves_the_unscored_out():
    """importance_centred (a guide drew the rollout) with groups of 2, one-token completions of weights 2, 3, 1,
    3 and advantages 1, 0 (unscored), -1, 1: group 1's weighted mean is over completion 0 alone (1), so both
    become 0; group 2's is (-1·1 + 1·3)/4 = 0.5: -1.5 and 0.5."""
    rollout = SimpleNamespace(
        sampler_details={"alpha": torch.tensor(0.5)},
        completion_mask=torch.ones(4, 1),
        scores=torch.tensor([1.0, nan, 0.0, 2.0]),
    )
    correction = {"sampler_weights": torch.tensor([[2.0], [3.0], [1.0], [3.0]])}
    centred = importance_centred(torch.tensor([1.0, 0.0, -1.0, 1.0]), rollout, correction, group_size=2)
    assert centred.tolist() == [0.0, 0.0, -1.5, 0.5]
