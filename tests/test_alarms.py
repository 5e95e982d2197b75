"""Reward-hacking and collapse alarms (alignkit.training.alarms): the statistics against hand-computed numbers,
the figures a rollout gives, each alarm firing on a trajectory built to trigger it and silent on a healthy one,
a resumed history firing exactly as an uninterrupted one, and the settings a run cannot use refused."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from alignkit.config.alarms import AlarmSettings
from alignkit.config.load import ConfigError, load_config
from alignkit.config.online import GRPOConfig, OnlineDPOConfig, PPOConfig
from alignkit.rollout import Rollout, layout
from alignkit.training.alarm_figures import ngram_codes, pooled_distinct_n, step_figures
from alignkit.training.alarm_stats import (
    distinct_n,
    ngrams,
    pearson,
    repeats_ngram,
    rise_z,
    slope,
    thirds,
    trend,
)
from alignkit.training.alarms import Alarms, AlarmStop

# ------------------------------------------------------------------------------------------------ statistics


def test_pearson_and_slope_against_hand_computed_numbers():
    """x = 1, 2, 3, 4 (mean 2.5), y = 2, 4, 5, 9 (mean 5): centred x -1.5, -0.5, 0.5, 1.5 and y -3, -1, 0, 4;
    Sxy = 4.5 + 0.5 + 0 + 6 = 11, Sxx = 2.25 + 0.25 + 0.25 + 2.25 = 5, Syy = 9 + 1 + 0 + 16 = 26:
    r = 11 / sqrt(5 · 26) = 0.964764, slope = 11 / 5 = 2.2."""
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130), abs=1e-12)
    assert slope([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(2.2, abs=1e-12)
    assert pearson([1, 2, 3, 4], [-2, -4, -6, -8]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None and pearson([7], [1]) is None  # undefined, not 0
    assert slope([3, 3, 3], [1, 2, 3]) is None


def test_trend_and_thirds_against_hand_computed_numbers():
    """trend(1, 3, 2, 6) at steps 0..3 (mean 1.5): centred steps -1.5, -0.5, 0.5, 1.5, values (mean 3) -2, 0,
    -1, 3; Sxy = 3 + 0 - 0.5 + 4.5 = 7, Sxx = 5, Syy = 4 + 0 + 1 + 9 = 14: slope 1.4, r = 7 / sqrt(70) = 0.836660.
    thirds(1..10): k = 3, means of (1, 2, 3), (4, 5, 6, 7), (8, 9, 10) = 2, 5.5, 9 (centres 1, 4.5, 8: equal
    spans)."""
    s, r = trend([1, 3, 2, 6])
    assert s == pytest.approx(1.4) and r == pytest.approx(7 / math.sqrt(70))
    assert trend([2, 2, 2]) == (0.0, 0.0)
    assert thirds(list(range(1, 11))) == (2.0, 5.5, 9.0)
    assert thirds([1, 2, 3]) == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError):
        thirds([1, 2])


def test_distinct_n_and_repeated_ngrams_against_hand_counts():
    """Completions (1 2 3 1 2) and (1 2 4): bigrams 12 23 31 12 | 12 24, six of which four distinct (12, 23,
    31, 24): distinct-2 = 4/6; trigrams 123 231 312 | 124, all distinct: distinct-3 = 1. The first repeats
    the bigram 12, no trigram."""
    seqs = [[1, 2, 3, 1, 2], [1, 2, 4]]
    assert ngrams([1, 2, 3], 2) == [(1, 2), (2, 3)] and ngrams([1], 2) == []
    assert distinct_n(seqs, 2) == pytest.approx(4 / 6)
    assert distinct_n(seqs, 3) == 1.0
    assert distinct_n([[1], [2]], 2) is None  # no completion of 2 tokens: undefined
    assert distinct_n([[5, 5, 5, 5]], 2) == pytest.approx(1 / 3)  # one bigram, three times
    assert repeats_ngram([1, 2, 3, 1, 2], 2) and not repeats_ngram([1, 2, 3, 1, 2], 3)
    assert not repeats_ngram([1, 2], 4)


def two_process_gather(other: list[torch.Tensor]):
    """The `gather` of process 0 of two, where process 1 sends `other` (its tensors, in call order)."""
    sent = list(other)

    def gather(x):
        return torch.cat([x, sent.pop(0).to(x.dtype)])

    return gather


def test_ngram_codes_pack_token_ids_exactly():
    """Bigrams of (1 2 3) and (1 2): ids below 2^31 packed as two base-2^31 digits: 1·2^31 + 2, 2·2^31 + 3,
    1·2^31 + 2; no bigram spans two sequences, a 1-token one has none. Ids of 2^31 and above fall back to
    Python's hash of the tuple (equal n-grams, equal codes)."""
    assert ngram_codes([[1, 2, 3], [1, 2], [7]], 2).tolist() == [2**31 + 2, 2 * 2**31 + 3, 2**31 + 2]
    assert ngram_codes([[4, 5, 6]], 3).tolist() == [4 * 2**42 + 5 * 2**21 + 6]
    big = ngram_codes([[2**40, 1, 2**40, 1]], 2).tolist()
    assert big[0] == big[2] == hash((2**40, 1)) and big[1] != big[0]


def test_pooled_distinct_n_over_two_processes_equals_distinct_n_of_all():
    """The hashes of each process's distinct n-grams and its n-gram count give the distinct-n of the whole
    step, without sending the completions: a bigram both processes hold counts once."""
    mine, theirs = [[1, 2, 3, 1, 2]], [[1, 2, 4], [9, 9]]
    sent = []
    pooled_distinct_n(theirs, 2, lambda x: sent.append(x) or x)  # what process 1 sends
    assert pooled_distinct_n(mine, 2, two_process_gather(sent)) == pytest.approx(distinct_n(mine + theirs, 2))
    assert distinct_n(mine + theirs, 2) == pytest.approx(5 / 7)  # 12 23 31 12 | 12 24 | 99


def hand_rollout() -> tuple[Rollout, dict]:
    """Four completions after a 1-token prompt: (5 6 5 6), (7 8), (9), (5 6 7), rewards 2, 1, 0, 2; the sampler
    and the reference give every completion token log-prob -1 and -1.5; sources a and b."""
    completions = [[5, 6, 5, 6], [7, 8], [9], [5, 6, 7]]
    input_ids, attention_mask, completion_mask = layout([[1]] * 4, completions, 0)
    rollout = Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        prompt_lengths=[1] * 4,
        completion_lengths=[len(c) for c in completions],
        ended=torch.ones(4, dtype=torch.bool),
        prompts=["p"] * 4,
        completions=["x"] * 4,
        scores=torch.tensor([2.0, 1.0, 0.0, 2.0]),
        source_scores={"a": torch.zeros(4), "b": torch.zeros(4)},
        reward_stats={},
        group_size=2,
        sampler_logps=-1.0 * completion_mask.float(),
        ref_logps=-1.5 * completion_mask.float(),
    )
    record = {
        "reward": 1.25,
        "completion_length": 2.5,
        "frac_reward_zero_std": 0.5,
        "rewards/a/mean": 0.3,
        "rewards/b/mean": 0.2,
    }
    return rollout, record


def test_step_figures_of_a_hand_built_rollout():
    """Lengths 4, 2, 1, 3 (mean 2.5) and rewards 2, 1, 0, 2 (mean 1.25): centred 1.5, -0.5, -1.5, 0.5 and 0.75,
    -0.25, -1.25, 0.75; Sxy = 1.125 + 0.125 + 1.875 + 0.375 = 3.5, Sxx = 5, Syy = 2.75: r = 3.5 / sqrt(13.75) =
    0.943880, 0.7 reward per token. k1 = -1 - (-1.5) = 0.5 on each of the 10 tokens; with no entropy in the
    record, the sampled tokens' mean negative log-prob, 1. Bigrams 56 65 56 | 78 | - | 56 67: 4 distinct of 6;
    trigrams 565 656 | 567: 3 of 3. Only the first repeats a bigram: 1/4. Source b's weight is negative: -0.2."""
    rollout, record = hand_rollout()
    out = step_figures(rollout, record, source_signs={"a": 1.0, "b": -1.0}, repeat_ngram=2)
    assert out["len_reward_corr"] == pytest.approx(3.5 / math.sqrt(13.75))
    assert (
        out["reward_n"],
        out["reward_len_var"],
        out["reward_var"],
        out["len_reward_cov"],
    ) == pytest.approx((4, 5 / 4, 2.75 / 4, 3.5 / 4))
    assert "return" not in out  # (the reward is what the update maximises)
    assert out["kl"] == pytest.approx(0.5) and out["entropy"] == pytest.approx(1.0)
    assert out["distinct_2"] == pytest.approx(4 / 6) and out["distinct_3"] == 1.0
    assert out["repeated"] == pytest.approx(0.25)
    assert out["zero_std"] == 0.5 and out["reward"] == 1.25 and out["length"] == 2.5
    assert out["source/a"] == pytest.approx(0.3) and out["source/b"] == pytest.approx(-0.2)
    # A return of reward - 0.1 x length (1.6, 0.8, -0.1, 1.7): mean 1, cov with length 3.5/4 - 0.1 x 5/4 = 3/4.
    penalised = rollout.scores - 0.1 * torch.tensor([4.0, 2.0, 1.0, 3.0])
    out = step_figures(rollout, record, returns=penalised)
    assert out["return"] == pytest.approx(1.0) and out["len_return_cov"] == pytest.approx((3.5 - 0.5) / 4)
    # With dynamic sampling the trained groups are the informative ones: the share is of every group drawn,
    # dropped (3) and topped up (1) of 8 kept + 3 + 1 + 2 surplus = 4/14.
    counts = {"kept": 8.0, "dropped": 3.0, "topped_up": 1.0, "surplus": 2.0}
    drawn = {f"dynamic_sampling/groups_{k}": v for k, v in counts.items()}
    assert step_figures(rollout, {**record, **drawn})["zero_std"] == pytest.approx(4 / 14)
    # A completion no source scored (NaN) says nothing of length: the moments are of the 3 scored ones.
    rollout.scores = torch.tensor([2.0, 1.0, math.nan, 2.0])
    out = step_figures(rollout, record)
    assert out["reward_n"] == 3 and out["len_reward_corr"] == pytest.approx(pearson([4, 2, 3], [2, 1, 2]))
    rollout.scores = torch.tensor([2.0, 1.0, 0.0, 2.0])
    # The record's entropy (the policy's, over the update's tokens) is used where the command logs one; the
    # trainer's own log-probs are preferred to the sampler's for the KL; online-dpo takes no KL.
    rollout.old_logps = -1.25 * rollout.completion_mask.float()
    out = step_figures(rollout, {**record, "entropy": 0.7}, reference=True)
    assert out["entropy"] == 0.7 and out["kl"] == pytest.approx(0.25)
    assert "kl" not in step_figures(rollout, record, reference=False)


# ------------------------------------------------------------------------------------------------ the alarms


def within_step(*, corr: float, per_token: float | None, signal: str = "reward") -> dict:
    """The within-step moments of 16 completions whose lengths have variance 25 (sd 5) and whose `signal`
    correlates `corr` with them at `per_token` a token: cov = per_token x 25, var = cov² / (corr² x 25)
    (per_token None: a reward of variance 0.01)."""
    cov = per_token * 25 if per_token is not None else corr * 5 * 0.1
    return {
        f"{signal}_n": 16.0,
        f"{signal}_len_var": 25.0,
        f"{signal}_var": cov**2 / (corr**2 * 25) if corr else 0.01,
        f"len_{signal}_cov": cov,
        f"len_{signal}_corr": corr,
    }


def run_alarms(steps: list[dict], settings: AlarmSettings | None = None) -> list:
    """[(step, record, fired)] of an Alarms fed `steps` (each a dict of figures), steps counted from 1."""
    alarms = Alarms(settings or AlarmSettings())
    return [(t, *(lambda c: (c.record, c.fired))(alarms.update(f))) for t, f in enumerate(steps, 1)]


def first_fired(results, name: str) -> int | None:
    return next((t for t, _, fired in results if name in fired), None)


def healthy(t: int, rng: random.Random) -> dict:
    """A healthy run's step t: reward rising slowly, length stable, entropy easing from 2.0 to ~1.4 over 100
    steps, the KL rising linearly (0.002 nats/token per step), diversity steady, two sources both rising,
    every figure with noise."""
    noise = lambda scale: rng.gauss(0, scale)  # noqa: E731
    return {
        "reward": 0.01 * t + noise(0.05),
        "length": 30 + noise(1.0),
        **within_step(corr=noise(0.15), per_token=None),
        "entropy": 2.0 * (1 - 0.003 * t) + noise(0.02),
        "kl": 0.002 * t + abs(noise(0.003)),
        "distinct_2": 0.7 + noise(0.02),
        "distinct_3": 0.9 + noise(0.02),
        "repeated": max(0.0, 0.1 + noise(0.03)),
        "zero_std": max(0.0, 0.2 + noise(0.05)),
        "source/judge": 0.005 * t + noise(0.03),
        "source/classifier": 0.003 * t + noise(0.03),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_healthy_run_raises_no_alarm(seed):
    rng = random.Random(seed)
    results = run_alarms([healthy(t, rng) for t in range(1, 201)])
    assert not [(t, fired) for t, _, fired in results if fired]
    record = results[-1][1]  # every alarm is logged (0) with its figures
    assert {k for k in record if k.startswith("alarm/")} == {
        f"alarm/{n}"
        for n in (
            "length_exploitation",
            "length_drift",
            "entropy_collapse",
            "kl_runaway",
            "repetition",
            "source_disagreement",
            "zero_std_groups",
        )
    }
    assert record["alarm_stats/entropy_collapse/ratio"] == pytest.approx(0.41 / 0.991, abs=0.05)


def length_run(t: int, rng: random.Random, *, length_per_step: float, other_gain: float) -> dict:
    """Reward = 1 - 0.01 x length + other_gain x t + noise: shorter is better (within a step Pearson -0.5, 0.01
    reward less per token), and the length moves by length_per_step."""
    length = 31 + length_per_step * t
    return {
        "reward": 1 - 0.01 * length + other_gain * t + rng.gauss(0, 0.002),
        "length": length + rng.gauss(0, 0.1),
        **within_step(corr=-0.5, per_token=-0.01),
    }


def test_length_exploitation_fires_when_length_explains_the_reward_gain():
    """Replies shrinking 0.75 tokens a step (31 -> 8 over 30 steps, as in docs/ppo.md) at -0.01 reward per
    token: the length gives +0.0075 a step of a +0.0085 rise (88%), and over the window of steps 1-20 it moves
    19 x 0.75 = 14.25 tokens from 31 - 0.75 = 30.25, 47%: it fires from the first full window.
    """
    rng = random.Random(0)
    results = run_alarms([length_run(t, rng, length_per_step=-0.75, other_gain=0.001) for t in range(1, 31)])
    assert first_fired(results, "length_exploitation") == 20
    stats = results[19][1]
    assert stats["alarm_stats/length_exploitation/corr_reward"] == pytest.approx(-0.5)
    assert stats["alarm_stats/length_exploitation/explained_reward"] == pytest.approx(
        0.0075 / 0.0085, abs=0.1
    )
    assert "the reward correlates -0.50 with length" in results[19][2]["length_exploitation"]
    assert stats["alarm_stats/length_exploitation/length_change"] == pytest.approx(-14.25 / 30.25, abs=0.02)
    # The same correlation, but the length stays put: nothing is exploited (yet).
    rng = random.Random(0)
    flat = run_alarms([length_run(t, rng, length_per_step=0.0, other_gain=0.001) for t in range(1, 31)])
    assert first_fired(flat, "length_exploitation") is None
    # The length shrinks, but the reward rises ten times faster for other reasons: length explains ~12%.
    rng = random.Random(0)
    earned = run_alarms([length_run(t, rng, length_per_step=-0.75, other_gain=0.05) for t in range(1, 31)])
    assert first_fired(earned, "length_exploitation") is None
    assert earned[-1][1]["alarm_stats/length_exploitation/explained_reward"] == pytest.approx(
        0.0075 / 0.0575, abs=0.02
    )
    # The length shrinks the way the reward pays while the reward falls a little (something else is given up for
    # it): fires, saying so.
    rng = random.Random(0)
    flat_reward = run_alarms(
        [length_run(t, rng, length_per_step=-0.75, other_gain=-0.009) for t in range(1, 31)]
    )
    assert first_fired(flat_reward, "length_exploitation") == 20
    assert "while it did not rise" in flat_reward[19][2]["length_exploitation"]
    # The same correlation -0.5 over 4 completions a step: |r|·sqrt(80 - 2) = 4.4 standard errors, fires; at -0.3,
    # 0.3 x sqrt(78) = 2.65 < length_z = 3: a few noisy completions, silent.
    for corr, fires in ((-0.5, True), (-0.3, False)):
        rng = random.Random(0)
        few = [length_run(t, rng, length_per_step=-0.75, other_gain=0.001) for t in range(1, 21)]
        few = [{**f, **within_step(corr=corr, per_token=-0.01), "reward_n": 4.0} for f in few]
        results = run_alarms(few)
        assert (first_fired(results, "length_exploitation") == 20) is fires
        assert results[19][1]["alarm_stats/length_exploitation/z_reward"] == pytest.approx(
            -corr * math.sqrt(78)
        )


def test_length_exploitation_reads_the_return_the_update_maximises():
    """A reward blind to length (r 0.05) while the return, the reward less β·KL, pays 0.01 per token less (a
    per-token KL penalty favours short replies): the return's correlation fires the alarm and is named."""
    rng = random.Random(0)
    steps = []
    for t in range(1, 26):
        f = length_run(t, rng, length_per_step=-0.75, other_gain=0.0)
        f.update(within_step(corr=0.05, per_token=None), reward=0.9 + rng.gauss(0, 0.002))
        f.update(within_step(corr=-0.5, per_token=-0.01, signal="return"), **{"return": 0.9 + 0.0075 * t})
        steps.append(f)
    results = run_alarms(steps)
    assert first_fired(results, "length_exploitation") == 20
    why = results[19][2]["length_exploitation"]
    assert (
        "the return the update maximises (the reward less β·KL, with a length penalty) correlates -0.50"
        in why
    )
    assert "the reward correlates" not in why
    assert results[19][1]["alarm_stats/length_exploitation/corr_reward"] == pytest.approx(0.05)


def test_length_drift_fires_when_the_length_halves_or_doubles_and_can_be_turned_off():
    """Lengths 33, 28, 15, 28, 20 (start: 124 / 5 = 24.8), then 18, 22, 14, 18, 12, 13, 10: the mean of the last
    3 is (18 + 12 + 13) / 3 = 14.33 at step 11 (58%), (12 + 13 + 10) / 3 = 11.67 at step 12 (47% < 1/2): fires at
    12. Doubling fires the same way; length_ratio=0 turns it off (reasoning RL grows its completions on purpose)."""
    lengths = [33, 28, 15, 28, 20, 18, 22, 14, 18, 12, 13, 10]
    results = run_alarms([{"reward": 0.0, "length": float(x)} for x in lengths])
    assert first_fired(results, "length_drift") == 12
    assert results[11][1]["alarm_stats/length_drift/ratio"] == pytest.approx((35 / 3) / 24.8)
    assert "11.7 tokens (last 3 steps) is 47% of its start 24.8" in results[11][2]["length_drift"]
    grown = run_alarms([{"reward": 0.0, "length": 10.0 * 1.2**t} for t in range(12)])
    # start (10 + 12 + 14.4 + 17.28 + 20.736) / 5 = 14.88; at step 8, 10 x (1.2^5 + 1.2^6 + 1.2^7) / 3 = 30.19 >
    # 2 x 14.88 = 29.77 (at step 7, 25.16)
    assert first_fired(grown, "length_drift") == 8
    off = run_alarms([{"reward": 0.0, "length": float(x)} for x in lengths], AlarmSettings(length_ratio=0))
    assert "alarm/length_drift" not in off[-1][1]


def test_entropy_collapse_fires_below_its_fraction_of_the_start():
    """Entropy 2.0 for 5 steps, then x0.8 a step: 1.6, 1.28, 1.024, 0.8192, 0.65536, 0.524288, 0.4194304,
    0.33554432, 0.268435456 at steps 6-14. The mean of the last 3 against 0.2 x 2.0 = 0.4: at step 13
    (0.524288 + 0.4194304 + 0.33554432) / 3 = 0.426421, at step 14 (0.4194304 + 0.33554432 + 0.268435456) / 3 =
    1.023410176 / 3 = 0.341137 < 0.4: fires at 14, at 17% of the start."""
    entropy = [2.0] * 5 + [2.0 * 0.8**k for k in range(1, 20)]
    results = run_alarms([{"reward": 0.0, "length": 10.0, "entropy": h} for h in entropy])
    assert first_fired(results, "entropy_collapse") == 14
    assert results[13][1]["alarm_stats/entropy_collapse/ratio"] == pytest.approx(
        1.023410176 / 3 / 2.0, abs=1e-9
    )
    assert "is 17% of its start 2" in results[13][2]["entropy_collapse"]


def test_kl_runaway_fires_above_its_bound_and_on_super_linear_growth_only():
    base = {"reward": 0.0, "length": 10.0}
    # Above kl_max = 0.5: the mean of the last 3 of 0.3, 0.45, 0.6, 0.7 passes it at step 4 (0.583).
    results = run_alarms([{**base, "kl": k} for k in (0.3, 0.45, 0.6, 0.7)])
    assert first_fired(results, "kl_runaway") == 4
    # Growth is read from step 25, after the 5 baseline steps and a full window of 20 (steps 6-25), whose
    # thirds are 6, 8 and 6 steps. KL 0.05 at steps 1-5, then 0.1 (6 steps), 0.2 (8), 0.45 (6): a, b, c = 0.1,
    # 0.2, 0.45: the last rise 0.25 is 2.5x the first 0.1, c = 4.5 a, c > 0.02: fires at 25, and not before.
    kls = [0.05] * 5 + [0.1] * 6 + [0.2] * 8 + [0.45] * 6
    results = run_alarms([{**base, "kl": k} for k in kls])
    assert first_fired(results, "kl_runaway") == 25
    assert results[24][1]["alarm_stats/kl_runaway/growth"] == pytest.approx(2.5)
    assert "0.1 -> 0.2 -> 0.45 nats per token" in results[24][2]["kl_runaway"]
    # Exponential growth, x1.2 a step from 0.002: fires at 25 too (its last third is 0.002 x 1.2^23 = 0.13).
    results = run_alarms([{**base, "kl": 0.002 * 1.2**t} for t in range(1, 30)])
    assert first_fired(results, "kl_runaway") == 25
    # Rising linearly (0.004 a step, ratio 1) or from 0 as t² (the start of every run with a reference, read
    # after the start: ratio < 1.5), or flat with 20% noise: silent.
    rng = random.Random(0)
    for kls in (
        [0.004 * t for t in range(1, 120)],
        [0.0005 * t**2 for t in range(1, 32)],
        [0.05 * (1 + rng.gauss(0, 0.2)) for _ in range(300)],
    ):
        assert first_fired(run_alarms([{**base, "kl": k} for k in kls]), "kl_runaway") is None


def test_kl_runaway_stays_silent_on_a_healthy_runs_noisy_kl():
    """A healthy run's per-token KL is heavy-tailed: measured on the arithmetic GRPO runs of docs/online_rl.md,
    steps around 0.05-0.1 with single steps at 3.1 and 11.5 (a completion through a token the reference all but
    rules out). Such a series, flat in expectation (log-normal noise, sigma 0.7, around 0.08, and one step in
    150 a spike of 30x), fired kl_runaway 86 times in 2,000 steps (those runs: 40-55) when the alarm read the mean of the last
    3 steps and the thirds' means alone; the median, and a rise that must stand 3 standard errors out of the
    steps' own spread, keep it silent. A real runaway under the same noise still fires."""
    base = {"reward": 0.0, "length": 10.0}
    rng = random.Random(1)

    def noisy(level: float, t: int) -> float:
        spike = 30.0 if t % 150 == 75 else 1.0
        return level * math.exp(rng.gauss(0, 0.7)) * spike

    flat = [noisy(0.08, t) for t in range(2000)]
    results = run_alarms([{**base, "kl": k} for k in flat])
    assert [t for t, _, fired in results if "kl_runaway" in fired] == []
    # a lone spike of 30x: silent; two within the last 3 steps: fires (median 2.4 > 0.5)
    quiet = [0.08] * 30
    assert first_fired(run_alarms([{**base, "kl": k} for k in quiet[:29] + [2.4]]), "kl_runaway") is None
    assert first_fired(run_alarms([{**base, "kl": k} for k in quiet[:28] + [2.4, 2.4]]), "kl_runaway") == 30
    # the same noise on a KL growing x1.1 a step from 0.02: fires, once it is above the growth floor
    growing = [noisy(0.02 * 1.1**t, t) for t in range(60)]
    fired = first_fired(run_alarms([{**base, "kl": k} for k in growing]), "kl_runaway")
    assert fired is not None and fired <= 45, fired


def test_rise_z_is_the_rise_in_standard_errors():
    # first third 1, 2, 3 (mean 2, variance 1), last 7, 8, 9 (mean 8, variance 1): (8 - 2) / sqrt(2 / 3)
    assert rise_z([1, 2, 3, 0, 0, 0, 7, 8, 9]) == pytest.approx(6 / math.sqrt(2 / 3))
    assert rise_z([1, 1, 5, 5, 2, 2]) == math.inf and rise_z([1, 1, 5, 5, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="at least 6"):
        rise_z([1, 2, 3, 4, 5])


def test_repetition_fires_when_distinct_n_collapses_or_repeats_rise():
    base = {"reward": 0.0, "length": 10.0, "distinct_3": 0.9, "repeated": 0.1}
    # distinct-2 from 0.8 to 0.3: the mean of the last 3 against 0.5 x 0.8 = 0.4 is (0.6 + 0.45 + 0.35) / 3 =
    # 0.467 at step 8, (0.45 + 0.35 + 0.3) / 3 = 0.367 at step 9: fires at 9, at 46% of the start.
    d2 = [0.8] * 5 + [0.6, 0.45, 0.35, 0.3]
    results = run_alarms([{**base, "distinct_2": d} for d in d2])
    assert first_fired(results, "repetition") == 9
    assert "distinct-2 0.367 is 46% of its start 0.800" in results[8][2]["repetition"]
    # Completions come to repeat a 4-gram: 0.1 -> 0.55; the mean of the last 3 against 0.1 + 0.3 is
    # (0.1 + 0.3 + 0.45) / 3 = 0.283 at step 7, (0.3 + 0.45 + 0.55) / 3 = 0.433 at step 8: fires at 8.
    rep = [0.1] * 5 + [0.3, 0.45, 0.55, 0.5]
    results = run_alarms([{**base, "distinct_2": 0.8, "repeated": r} for r in rep])
    assert first_fired(results, "repetition") == 8
    # An absolute floor catches a run that starts collapsed.
    results = run_alarms([{**base, "distinct_2": 0.08} for _ in range(6)])
    assert first_fired(results, "repetition") == 5


def test_reward_source_disagreement_fires_when_one_rises_at_the_others_expense():
    """A judge rising while a classifier (signed by its weight) falls: correlated -1 over the window, trends
    +1 and -1, the judge above its start, the classifier below: fires from the first full window (20). Both
    rising, or two flat noisy sources (2,000 steps), stay silent."""
    base = {"reward": 0.0, "length": 10.0}
    results = run_alarms(
        [{**base, "source/judge": 0.1 * t, "source/classifier": -0.05 * t} for t in range(1, 26)]
    )
    assert first_fired(results, "source_disagreement") == 20
    assert results[19][1]["alarm_stats/source_disagreement/corr/judge/classifier"] == pytest.approx(-1.0)
    assert "judge rises while classifier falls" in results[19][2]["source_disagreement"]
    together = run_alarms(
        [{**base, "source/judge": 0.1 * t, "source/classifier": 0.05 * t} for t in range(1, 26)]
    )
    assert first_fired(together, "source_disagreement") is None
    rng = random.Random(0)
    noise = [
        {**base, "source/judge": rng.gauss(0, 1), "source/classifier": rng.gauss(0, 1)} for _ in range(2000)
    ]
    assert first_fired(run_alarms(noise), "source_disagreement") is None


def test_zero_std_groups_fire_above_their_bound():
    base = {"reward": 0.0, "length": 10.0}
    results = run_alarms([{**base, "zero_std": z} for z in (0.5, 0.9, 1.0, 1.0, 1.0)])
    assert first_fired(results, "zero_std_groups") == 4  # (0.9 + 1 + 1) / 3 = 0.967 > 0.8; at 3, 0.8
    assert first_fired(run_alarms([{**base, "zero_std": 0.75} for _ in range(20)]), "zero_std_groups") is None


def test_a_resumed_history_fires_exactly_as_an_uninterrupted_one():
    """Fed 18 steps, saved (through torch.save / weights_only load, as a checkpoint holds it) and loaded into
    a fresh Alarms, the history gives the next 22 steps' records and alarms, and onsets, bit for bit."""
    rng = random.Random(3)
    steps = [length_run(t, rng, length_per_step=-0.75, other_gain=0.001) for t in range(1, 41)]
    for t, f in enumerate(steps, 1):
        f.update(entropy=2.0 * 0.95**t, kl=0.01 * 1.2**t, distinct_2=0.8 - 0.01 * t, zero_std=0.02 * t)
    whole = Alarms(AlarmSettings())
    expected = [whole.update(f) for f in steps]
    first = Alarms(AlarmSettings())
    for f in steps[:18]:
        first.update(f)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = Alarms(AlarmSettings())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [resumed.update(f) for f in steps[18:]]
    assert [(c.record, c.fired, c.onsets) for c in got] == [
        (c.record, c.fired, c.onsets) for c in expected[18:]
    ]
    assert {name for c in expected for name in c.fired} >= {
        "length_exploitation",
        "entropy_collapse",
        "kl_runaway",
    }


def test_a_step_without_a_figure_is_no_verdict_and_no_crash():
    """A diverged step's NaN is left out of the figures (`step_figures`): the alarms that read it give no verdict
    while it is in their window, and the rest go on."""
    rng = random.Random(0)
    steps = [length_run(t, rng, length_per_step=-0.75, other_gain=0.001) for t in range(1, 31)]
    for f in steps:
        f["entropy"] = 1.0
    del steps[24]["reward"], steps[24]["entropy"]
    results = run_alarms(steps)
    assert "alarm/entropy_collapse" not in results[24][1] and results[25][1]["alarm/entropy_collapse"] == 0
    assert [t for t, _, fired in results if "length_exploitation" in fired] == [20, 21, 22, 23, 24]


def test_alarm_stop_names_the_step_the_alarms_and_how_to_go_on():
    e = AlarmStop(7, {"zero_std_groups": "100% of groups ..."}, "out/checkpoints/checkpoint-7")
    assert e.step == 7 and "after step 7" in str(e) and "zero_std_groups: 100% of groups" in str(e)
    assert "resume=true with alarms.stop_on_alarm=false" in str(e)


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("cls", "overrides", "message"),
    [
        (GRPOConfig, ["beta=0", "alarms.kl_max=1"], "alarms.kl_max=1.0 has no effect: the kl_runaway alarm"),
        (GRPOConfig, ["alarms.source_corr=-0.3"], "compares 2 or more reward sources, got 1"),
        (PPOConfig, ["alarms.zero_std_max=0.5"], "groups of num_generations > 1"),
        (OnlineDPOConfig, ["alarms.kl_growth=3"], "takes no KL of every completion"),
        (
            GRPOConfig,
            ["alarms.enabled=false", "alarms.window=5"],
            "alarms.window=5 has no effect with alarms.enabled",
        ),
        (GRPOConfig, ["alarms.smoothing=25"], "alarms.smoothing=25 must not exceed alarms.window=20"),
    ],
)
def test_settings_an_alarm_cannot_use_are_refused_before_anything_loads(cls, overrides, message):
    import alignkit.algorithms.grpo as grpo
    import alignkit.algorithms.online_dpo as online_dpo
    import alignkit.algorithms.ppo as ppo

    check = {
        GRPOConfig: grpo.check_settings,
        PPOConfig: ppo.check_settings,
        OnlineDPOConfig: online_dpo.check_settings,
    }
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg = load_config(cls, None, ["model=m", "data=d.jsonl", "rewards=[{type: vader}]", *overrides])
        check[cls](cfg)


def test_alarm_settings_are_not_in_the_resume_fingerprint():
    """A stopped run goes on with other alarm settings (stop_on_alarm=false, another threshold)."""
    from alignkit.training.checkpoint import run_fingerprint

    a = run_fingerprint(GRPOConfig(model="m", data="d"))
    b = run_fingerprint(GRPOConfig(model="m", data="d", alarms=AlarmSettings(stop_on_alarm=True, window=20)))
    assert a == b and not [k for k in a if k.startswith("alarms")]
