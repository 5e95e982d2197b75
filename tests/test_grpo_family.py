"""The modern GRPO family in `alignkit grpo` (docs/online_rl.md, *The GRPO family*): DAPO's overlong punishment and
its unanimous-group test, GDPO's normalise-then-sum advantage, the high-entropy-token threshold (each against
numbers derived by hand), the settings they refuse, and dynamic sampling's joint decision and group picking."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import alignkit.algorithms.grpo as grpo
from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError
from alignkit.config.online import GRPOConfig
from alignkit.losses.entropy_tokens import entropy_threshold, high_entropy_mask
from alignkit.losses.group_rewards import normalize_then_sum, overlong_penalty, unanimous_groups
from alignkit.losses.policy import compute_advantages
from alignkit.rollout import Rollout, layout
from alignkit.training.dynamic_sampling import collect_informative, pick_groups, select_groups
from alignkit.training.grpo_family import RewardTerms, high_entropy_tokens


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=atol, rtol=0
    )


# --- DAPO: overlong punishment ---------------------------------------------------------------------------


def test_overlong_penalty_by_hand():
    """L_max = 8, L_cache = 4, so the ramp starts after L_max − L_cache = 4 tokens:
    |y| = 0, 3, 4 -> 0 (within budget − cache); 5 -> (4 − 5)/4 = −0.25; 6 -> −0.5; 7 -> −0.75;
    8 (the budget, no EOS) -> −1; 9 (beyond L_max, e.g. a sampler that overran) -> −1."""
    lengths = torch.tensor([0, 3, 4, 5, 6, 7, 8, 9])
    close(overlong_penalty(lengths, max_length=8, cache=4), [0, 0, 0, -0.25, -0.5, -0.75, -1, -1])
    # L_cache = L_max: every token of the budget is on the ramp, |y| = 2 of 8 -> −2/8
    close(overlong_penalty(torch.tensor([0, 2, 8]), max_length=8, cache=8), [0, -0.25, -1])
    with pytest.raises(ValueError, match="cache=9 must be in"):
        overlong_penalty(lengths, max_length=8, cache=9)


def test_the_overlong_penalty_is_added_to_the_reward_with_its_weight():
    """RewardTerms (multi_reward=sum): scores [1, 0] of completions of 3 and 7 tokens, L_max 8, L_cache 4,
    weight 0.5: 1 + 0.5·0 = 1 and 0 + 0.5·(4 − 7)/4 = −0.375; and its metrics: mean penalty (0 − 0.75)/2,
    half the completions penalised."""
    rollout = fake_rollout([[1.0, 0.0]], [3, 7])
    terms = RewardTerms("sum", {"regex": 1.0}, 8, overlong_cache=4, overlong_weight=0.5)
    close(terms(rollout), [1.0, -0.375])
    assert terms.metrics(rollout) == {"overlong/penalty_mean": -0.375, "overlong/frac_penalised": 0.5}
    off = RewardTerms("sum", {"regex": 1.0}, 8)
    assert off(rollout) is rollout.scores and off.metrics(rollout) == {}  # off: the scores themselves


# --- DAPO: which groups carry no gradient ----------------------------------------------------------------


def test_unanimous_groups_by_hand():
    """G = 3: [1, 1, 1] is unanimous, [0, 1, 0] is not; with two terms a group is unanimous only when both
    are: ([1, 1, 1], [2, 2, 2]) is, ([1, 1, 1], [2, 5, 2]) is not (the second term still ranks it)."""
    assert unanimous_groups(torch.tensor([1.0, 1, 1, 0, 1, 0]), 3).tolist() == [True, False]
    two = torch.tensor([[1.0, 2], [1, 2], [1, 2], [1, 2], [1, 5], [1, 2]])
    assert unanimous_groups(two, 3).tolist() == [True, False]
    with pytest.raises(ValueError, match="not a whole number of groups of 4"):
        unanimous_groups(torch.zeros(6), 4)


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_a_unanimous_group_has_zero_advantage_under_every_estimator(advantage):
    """The premise of dropping them: a unanimous group's advantages are exactly 0 (here beside a mixed
    group, so the batch statistics are not degenerate)."""
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0])
    assert unanimous_groups(rewards, 4).tolist() == [True, False]
    assert torch.equal(compute_advantages(advantage, rewards, 4)[:4], torch.zeros(4))


# --- GDPO: normalise, then sum -----------------------------------------------------------------------------


def test_normalize_then_sum_by_hand_with_two_sources_on_very_different_scales():
    """Two groups of G = 4, two sources, weights 1 and 1: correctness in {0, 1} and a length penalty in the
    hundreds (in group 1) or tens (group 2).

    Group 1: correct = [1, 0, 1, 0]: mean 0.5, unbiased std sqrt(4·0.25/3) = sqrt(1/3), z = ±√3/2 = ±0.866025.
             length = [−120, −100, −60, −80]: mean −90, deviations [−30, −10, 30, 10], std sqrt(2000/3),
             z = [−3, −1, 3, 1]·sqrt(3/20) = [−1.161895, −0.387298, 1.161895, 0.387298].
             s = z_correct + z_length = [−0.295870, −1.253323, 2.027920, −0.478727].
    Group 2: correct = [1, 1, 1, 1]: unanimous, z = 0 (0 / (0 + eps)).
             length = [−10, −20, −10, −20]: deviations ±5, std sqrt(100/3), z = ±√3/2: s = [.866, −.866, .866, −.866].
    Batch: mean(s) = 0 (each z sums to 0 over its group); Σ s² = 2·3 + 0 + 3 (each z has Σz² = G − 1 = 3, and
    Σ z_c·z_l = 0.866·(−1.1619 − 0.3873·(−1) ...) = 0 in group 1), so std = sqrt(9/7) = 1.133893 and
    A = s / 1.133893 = [−0.260933, −1.105310, 1.788459, −0.422199 | 0.763763, −0.763763, 0.763763, −0.763763].
    (eps = 1e-4 in the stds moves these by < 1e-3.)

    The weighted sum then GRPO's z-score (multi_reward=sum) would rank group 1 by length alone: [−119, −100,
    −59, −80] -> the order of the lengths; here correctness counts as much as length."""
    correct = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 1])
    length = torch.tensor([-120.0, -100, -60, -80, -10, -20, -10, -20])
    A = normalize_then_sum(torch.stack([correct, length], -1), torch.tensor([1.0, 1.0]), 4)
    close(A, [-0.260933, -1.105310, 1.788459, -0.422199, 0.763763, -0.763763, 0.763763, -0.763763], atol=1e-3)
    summed = compute_advantages("grpo", correct + length, 4)
    assert summed[:4].argsort().tolist() == length[:4].argsort().tolist()  # the sum: length decides
    assert A[:4].argsort().tolist() != length[:4].argsort().tolist()  # GDPO: correctness moves completion 1
    # Only the weights' ratio matters (the batch z-score removes their scale); a zero weight drops a source.
    close(normalize_then_sum(torch.stack([correct, length], -1), torch.tensor([3.0, 3.0]), 4), A, atol=1e-3)
    only_length = normalize_then_sum(torch.stack([correct, length], -1), torch.tensor([0.0, 1.0]), 4)
    assert only_length[:4].argsort().tolist() == length[:4].argsort().tolist()


def test_normalize_then_sum_terms_carry_the_raw_sources_and_the_overlong_penalty():
    """RewardTerms (normalize_then_sum) hands every source's raw scores, in the weights' order, then the
    overlong penalty as one more term with its weight."""
    rollout = fake_rollout([[1.0, 0.0]], [3, 7], sources={"a": [1.0, 0.0], "b": [10.0, 30.0]})
    terms = RewardTerms("normalize_then_sum", {"b": 2.0, "a": 1.0}, 8, overlong_cache=4, overlong_weight=0.5)
    close(terms(rollout), [[10.0, 1.0, 0.0], [30.0, 0.0, -0.75]])
    close(terms.term_weights(), [2.0, 1.0, 0.5])


# --- high-entropy tokens ---------------------------------------------------------------------------------


def test_entropy_threshold_by_hand():
    """M = 10 entropies 0.0 .. 0.9: ρ = 0.2 keeps k = ⌈2⌉ = 2 tokens, τ = 0.8 (0.8 and 0.9); ρ = 0.25 keeps
    ⌈2.5⌉ = 3, τ = 0.7; ρ = 0.01 keeps at least one, τ = 0.9. Ties: [0.5, 0.5, 0.5, 0.1] at ρ = 0.25 has
    k = 1 but keeps all three tokens at τ = 0.5 (whatever their order)."""
    H = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 0.0])
    close(entropy_threshold(H, 0.2), 0.8)
    close(entropy_threshold(H, 0.25), 0.7)
    close(entropy_threshold(H, 0.01), 0.9)
    ties = torch.tensor([0.5, 0.5, 0.5, 0.1])
    close(entropy_threshold(ties, 0.25), 0.5)
    mask = high_entropy_mask(ties.view(2, 2), torch.ones(2, 2), entropy_threshold(ties, 0.25))
    assert mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert entropy_threshold(torch.zeros(0), 0.2) == math.inf
    with pytest.raises(ValueError, match="fraction=0 must be in"):
        entropy_threshold(H, 0)


def test_the_entropy_threshold_is_the_whole_steps_over_processes():
    """Two processes' rollouts, entropies [[0.9, 0.1, 0.2], [0.3, 0.4, 9.0 (padding)]] and [[0.8, 0.5, 0.6]]:
    the step's 8 counted tokens (padding left out) at ρ = 0.25 keep ⌈2⌉ = 2, τ = 0.8, over both processes;
    so process 1 keeps its 0.9 only, and 2 of 8 tokens are kept in all. Process 1 alone would have kept
    ⌈1.25⌉ = 2 of its 5, τ = 0.4: its 0.9 and its 0.4."""
    H1, m1 = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.4, 9.0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    H2 = torch.tensor([0.8, 0.5, 0.6])

    def gather(x):  # what process 1 gets: its rows, then process 2's
        if x.numel() == 5:
            return torch.cat([x, H2])  # the counted tokens' entropies
        return torch.cat([x, torch.tensor([1.0] if x.is_floating_point() else [3])])  # kept, counted tokens

    mask, record = high_entropy_tokens(H1, m1, 0.25, gather=gather)
    assert mask.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert record == {"entropy_tokens/threshold": pytest.approx(0.8), "entropy_tokens/frac_kept": 2 / 8}
    alone, _ = high_entropy_tokens(H1, m1, 0.25)
    assert alone.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


# --- settings --------------------------------------------------------------------------------------------


def config(**overrides) -> GRPOConfig:
    base = dict(
        model="/nowhere",
        data="/nowhere.jsonl",
        rewards=[{"type": "regex", "pattern": "e"}],
        batch_size=4,
        num_generations=4,
        generation=GenerationSettings(max_new_tokens=8),
        beta=0.0,
    )
    return GRPOConfig(**{**base, **overrides})


TWO = [{"type": "regex", "pattern": "e"}, {"type": "length", "weight": 0.1}]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dynamic_sampling": True, "num_generations": 1, "advantage": "reinforce_pp"}, "a group of one"),
        ({"dynamic_sampling_max_rollouts": 5}, "dynamic_sampling_max_rollouts=5 has no effect without"),
        ({"dynamic_sampling": True, "dynamic_sampling_max_rollouts": 0}, "must be >= 1"),
        ({"overlong_cache": 9}, "overlong_cache=9 is longer than the generation budget"),
        ({"overlong_weight": 2.0}, "overlong_weight=2.0 has no effect with overlong_cache=0"),
        ({"multi_reward": "normalize_then_sum"}, "normalize_then_sum with one reward term"),
        (
            {"multi_reward": "normalize_then_sum", "rewards": TWO, "advantage": "rloo"},
            "computes the advantage",
        ),
        (
            {"multi_reward": "normalize_then_sum", "rewards": TWO, "scale_rewards": "batch"},
            "computes the adv",
        ),
        (
            {"multi_reward": "normalize_then_sum", "rewards": TWO, "reward_normalize": True},
            "cancels a running",
        ),
        ({"multi_reward": "normalize_then_sum", "rewards": TWO, "reward_clip": 1.0}, "reward_clip clips"),
        (
            {"multi_reward": "normalize_then_sum", "rewards": TWO, "beta": 0.1, "kl_in_reward": True},
            "no single reward to subtract the KL from",
        ),
        ({"multi_reward": "mean"}, "'multi_reward' must be one of sum, normalize_then_sum"),
        ({"top_entropy_fraction": 1.0}, "'top_entropy_fraction' must be in \\(0, 1\\)"),
        ({"top_entropy_fraction": 0.0}, "'top_entropy_fraction' must be in \\(0, 1\\)"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        grpo.check_settings(config(**overrides))


def test_the_family_settings_pass_together():
    """One source plus the overlong penalty are two terms: normalize_then_sum accepts them."""
    grpo.check_settings(
        config(
            dynamic_sampling=True,
            dynamic_sampling_max_rollouts=2,
            overlong_cache=4,
            overlong_weight=0.5,
            multi_reward="normalize_then_sum",
            top_entropy_fraction=0.2,
        )
    )


# --- dynamic sampling: picking groups and the joint decision ---------------------------------------------


def fake_rollout(groups: list[list[float]], lengths: list[int] | None = None, *, sources=None) -> Rollout:
    """A rollout of len(groups) groups of G = len(groups[0]) completions with these scores; completion i has
    `lengths[i]` tokens (default i % 3 + 1), each token id 10 + i (so rows are told apart)."""
    G = len(groups[0])
    scores = torch.tensor([s for g in groups for s in g])
    n = len(scores)
    lengths = lengths or [i % 3 + 1 for i in range(n)]
    completions = [[10 + i] * k for i, k in enumerate(lengths)]
    input_ids, attention_mask, completion_mask = layout([[1]] * n, completions, pad_id=0)
    sources = {k: torch.tensor(v) for k, v in (sources or {"regex": scores.tolist()}).items()}
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        prompt_lengths=[1] * n,
        completion_lengths=lengths,
        ended=torch.tensor([k % 2 == 0 for k in lengths]),
        prompts=[f"p{i // G}" for i in range(n)],
        completions=[f"c{i}" for i in range(n)],
        scores=scores,
        source_scores=sources,
        reward_stats={},
        group_size=G,
        sampler_logps=-completion_mask.float(),
        timings={"generation": 1.0, "scoring": 0.5},
    )


def test_pick_groups_by_hand():
    """Draws with informative flags [F, T, F] and [T, T]: want 2 -> (0, 1), (1, 0), none topped up; want 4
    (the bound was hit with 3 informative) -> the 3, then the first unanimous one, (0, 0)."""
    flags = [torch.tensor([False, True, False]), torch.tensor([True, True])]
    assert pick_groups(flags, 2) == ([(0, 1), (1, 0)], 0)
    assert pick_groups(flags, 4) == ([(0, 1), (1, 0), (1, 1), (0, 0)], 1)


def test_select_groups_takes_whole_groups_across_draws():
    """Group 1 of draw 0 and group 0 of draw 1 (G = 2): their rows, padded to the longer draw's width,
    every per-row field with them; timings summed over the draws."""
    a = fake_rollout([[0.0, 0.0], [1.0, 0.0]], [1, 1, 1, 2])
    b = fake_rollout([[0.0, 1.0]], [3, 3])
    out = select_groups([a, b], [(0, 1), (1, 0)], pad_id=0)
    assert out.input_ids.tolist() == [[1, 12, 0, 0], [1, 13, 13, 0], [1, 10, 10, 10], [1, 11, 11, 11]]
    assert out.completion_mask.tolist() == [[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert out.attention_mask.sum(-1).tolist() == [2, 3, 4, 4]
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out.source_scores["regex"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out.completion_lengths == [1, 2, 3, 3] and out.prompt_lengths == [1] * 4
    assert out.completions == ["c2", "c3", "c0", "c1"] and out.prompts == ["p1", "p1", "p0", "p0"]
    assert out.ended.tolist() == [False, True, False, False]
    assert out.sampler_logps.tolist() == (-out.completion_mask.float()).tolist()
    assert out.timings == {"generation": 2.0, "scoring": 1.0} and out.group_size == 2


class FakeRun:
    """An OnlineRun stand-in: `collect` hands out prepared draws in order; `gather` adds the other
    processes' kept-group counts (one list per draw round) to this process's, as the real gather would."""

    def __init__(self, draws: list[Rollout], others_kept: list[int], batch_size: int, extra_draws: int):
        self.draws, self.others_kept, self.calls, self.extra_draws = draws, others_kept, [], extra_draws
        self.cfg = dataclasses.make_dataclass("Cfg", [("batch_size", int)])(batch_size)
        self.rounds = 0

    def collect(self, *args, draw: int = 0, **kwargs):
        self.calls.append(draw)
        return self.draws[draw], 1234

    def gather(self, x):
        if x.dim() == 1:  # the decision round's kept count
            other = self.others_kept[min(self.rounds, len(self.others_kept) - 1)]
            self.rounds += 1
            return torch.cat([x, torch.tensor([other])])
        return torch.cat([x, torch.tensor([[2, 1, 0, 0]])])  # the other process's final counts


def informative_run(draws, others_kept, max_rollouts=3):
    run = FakeRun(draws, others_kept, batch_size=2, extra_draws=max_rollouts)
    terms = RewardTerms("sum", {"regex": 1.0}, 8)
    out = collect_informative(
        run,
        None,
        None,
        None,
        None,
        sampling=None,
        group_size=2,
        reward_terms=terms,
        pad_id=0,
    )
    return run, out


def test_every_process_draws_again_while_any_is_short():
    """This process has its 2 groups after draw 0, but the other process has 1: both draw again (the other's
    count is gathered), and this one still trains on its first two; then the other has 2 and both stop."""
    d0 = fake_rollout([[1.0, 0.0], [0.0, 1.0]])
    d1 = fake_rollout([[1.0, 0.0], [1.0, 1.0]])
    run, (rollout, seed, metrics) = informative_run([d0, d1, d1], others_kept=[1, 2])
    assert run.calls == [0, 1] and seed == 1234
    assert rollout.scores.tolist() == [1.0, 0.0, 0.0, 1.0]  # draw 0's groups; draw 1's informative is surplus
    assert metrics == {
        "dynamic_sampling/groups_kept": 4.0,
        "dynamic_sampling/groups_dropped": 2.0,  # this process's unanimous group of draw 1, the other's 1
        "dynamic_sampling/groups_topped_up": 0.0,
        "dynamic_sampling/groups_surplus": 1.0,
        "dynamic_sampling/extra_rollouts": 1.0,
    }


def test_when_the_bound_is_hit_the_batch_is_topped_up_with_dropped_groups():
    """max_rollouts = 1 and only one informative group in two draws: the step trains on it and on the first
    unanimous group (advantage 0), so the batch keeps its 2 groups; `groups_topped_up` says so."""
    d0 = fake_rollout([[1.0, 1.0], [0.0, 0.0]])
    d1 = fake_rollout([[0.0, 0.0], [0.0, 1.0]])
    run, (rollout, _, metrics) = informative_run([d0, d1], others_kept=[2, 2], max_rollouts=1)
    assert run.calls == [0, 1]
    assert rollout.scores.tolist() == [0.0, 1.0, 1.0, 1.0]  # draw 1's group 1, then draw 0's group 0
    assert (
        metrics["dynamic_sampling/groups_topped_up"] == 1.0
        and metrics["dynamic_sampling/extra_rollouts"] == 1
    )


def test_a_draw_with_nothing_to_drop_is_the_rollout_itself():
    d0 = fake_rollout([[1.0, 0.0], [0.0, 1.0]])
    run, (rollout, _, metrics) = informative_run([d0], others_kept=[2])
    assert rollout is d0 and run.calls == [0] and metrics["dynamic_sampling/extra_rollouts"] == 0
    run, (rollout, _, metrics) = informative_run([d0], others_kept=[2], max_rollouts=0)
    assert rollout is d0 and metrics == {}  # off


def test_the_objective_trains_only_the_selected_tokens():
    """Two completions of 3 tokens at ratio 1, advantages [1, −1], entropy_mask [[1, 0, 1], [0, 0, 1]],
    token_mean: the loss is −Σ m_t·ρ_t·A / 6 = −(1 + 1 − 1)/6 = −1/6 and its gradient in the log-probs −m·A/6
    = [[−1/6, 0, −1/6], [0, 0, 1/6]]: the unselected tokens get none, and the denominator stays every
    token of the batch (6), as the paper's 1/Σ|o_i|."""
    cfg = grpo.check_settings(config(loss_aggregation="token_mean", top_entropy_fraction=0.5))
    logps = torch.zeros(2, 3, requires_grad=True)

    def model(batch):
        return {"token_logps": logps, "token_entropy": torch.zeros(2, 3)}

    batch = {
        "loss_mask": torch.ones(2, 3),
        "advantages": torch.tensor([1.0, -1.0]),
        "entropy_mask": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
    }
    loss, _ = grpo.GRPOObjective(cfg, "token_mean")(model, batch)
    loss.backward()
    close(loss.detach(), -1 / 6)
    close(logps.grad, [[-1 / 6, 0, -1 / 6], [0, 0, 1 / 6]])
