"""The GRPO family end to end on the tiny test model: dynamic sampling drops unanimous groups, refills the batch
from the seeded order and resumes bit for bit; GDPO's advantages and the high-entropy tokens reach the loss."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import alignkit.algorithms.grpo as grpo
import alignkit.training.loop as online_loop
from alignkit.losses.group_rewards import normalize_then_sum, overlong_penalty, unanimous_groups
from alignkit.losses.policy_losses import POLICY_LOSSES
from tests.conftest import interrupt_then_resume, train_metrics, write_prompts
from tests.test_grpo import config

# 1.0 when the completion has a "v": on the tiny random policy about a third of the groups of 4 are unanimous
# (measured at seed 1: 8, 4, 0 and 5 groups dropped over the first 4 steps).
HAS_V = [{"type": "regex", "pattern": "v"}]
HAS_Q = [{"type": "regex", "pattern": "q"}]  # rarer: most groups are all 0


def spy_advantages(monkeypatch) -> list[torch.Tensor]:
    """The rewards every step's advantages are computed from (multi_reward=sum)."""
    seen, real = [], grpo.compute_advantages

    def spy(name, rewards, group_size, **kwargs):
        seen.append(rewards.clone())
        return real(name, rewards, group_size, **kwargs)

    monkeypatch.setattr(grpo, "compute_advantages", spy)
    return seen


def spy_policy_loss(monkeypatch) -> list[tuple]:
    """(logps, old_logps, advantages, mask) of every call of the grpo policy loss."""
    seen, real = [], POLICY_LOSSES["grpo"].fn

    def spy(logps, old_logps, advantages, mask, **kwargs):
        seen.append((logps.detach().clone(), old_logps.clone(), advantages.clone(), mask.clone()))
        return real(logps, old_logps, advantages, mask, **kwargs)

    monkeypatch.setitem(POLICY_LOSSES, "grpo", dataclasses.replace(POLICY_LOSSES["grpo"], fn=spy))
    return seen


def test_dynamic_sampling_drops_unanimous_groups_and_refills_the_batch(tmp_path, tiny_model_dir, monkeypatch):
    """Every step trains on batch_size = 4 groups, none unanimous: the unanimous ones are dropped and more
    prompts drawn. Without dynamic sampling the same seed trains on unanimous groups."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    seen = spy_advantages(monkeypatch)
    cfg = config(tmp_path / "ds", tiny_model_dir, data, rewards=HAS_V, max_steps=4, dynamic_sampling=True)
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    kept = [m["dynamic_sampling/groups_kept"] for m in metrics]
    assert kept == [4.0] * 4 and all(m["dynamic_sampling/groups_topped_up"] == 0 for m in metrics)
    assert sum(m["dynamic_sampling/groups_dropped"] for m in metrics) > 0
    assert sum(m["dynamic_sampling/extra_rollouts"] for m in metrics) > 0
    assert all(m["frac_reward_zero_std"] == 0 for m in metrics)
    assert len(seen) == 4
    for rewards in seen:
        assert rewards.shape == (16,) and not unanimous_groups(rewards, 4).any()

    plain = config(tmp_path / "plain", tiny_model_dir, data, rewards=HAS_V, max_steps=4)
    grpo.train(plain)
    assert sum(m["frac_reward_zero_std"] for m in train_metrics(plain)) > 0
    assert not any(k.startswith("dynamic_sampling/") for k in train_metrics(plain)[0])


def test_dynamic_sampling_resumes_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch):
    """Ctrl-C at the 4th draw (inside step 2, after step 1 made 2 extra draws): step 2 is finished and saved,
    and the resumed run redraws the same extra prompts for steps 3 and 4, with the same losses."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    settings = dict(rewards=HAS_V, max_steps=4, dynamic_sampling=True, reward_normalize=True, beta=0.05)
    whole = config(tmp_path / "a", tiny_model_dir, data, **settings)
    grpo.train(whole)
    expected = train_metrics(whole)
    assert sum(m["dynamic_sampling/extra_rollouts"] for m in expected[2:]) > 0  # the resumed steps refill

    cut = config(tmp_path / "b", tiny_model_dir, data, **settings)
    resumed = interrupt_then_resume(grpo.train, cut, monkeypatch, online_loop, "collect", 4)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(expected, resumed):
        same = {k: a[k] for k in a if not k.startswith(("time/", "tokens/s"))}
        assert same == {k: b[k] for k in same}, a["step"]


def test_when_the_bound_is_hit_the_step_trains_on_a_full_batch(tmp_path, tiny_model_dir):
    """A rare letter and one extra draw: the step keeps what it found, topped up with unanimous groups, and
    its minibatches and micro-batches are the usual ones (8 completions, 2 micro-batches)."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(
        tmp_path,
        tiny_model_dir,
        data,
        rewards=HAS_Q,
        max_steps=2,
        dynamic_sampling=True,
        dynamic_sampling_max_rollouts=1,
        minibatch_size=8,
        grad_accum=2,
    )
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    assert all(m["dynamic_sampling/extra_rollouts"] == 1 for m in metrics)
    assert any(m["dynamic_sampling/groups_topped_up"] > 0 for m in metrics)
    for m in metrics:
        assert m["dynamic_sampling/groups_kept"] + m["dynamic_sampling/groups_topped_up"] == 4


def test_gdpo_advantages_and_the_overlong_penalty_reach_the_loss(tmp_path, tiny_model_dir, monkeypatch):
    """multi_reward=normalize_then_sum with two sources and the overlong penalty (L_max 8, L_cache 4): the
    advantages the policy loss gets are normalize_then_sum of [the regex's scores, the length's, the penalty]
    with weights [1, 0.1, 0.5]; the tiny policy never ends, so every completion has the full penalty -1."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    rollouts, real = [], online_loop.collect
    monkeypatch.setattr(
        online_loop, "collect", lambda *a, **k: rollouts.append(real(*a, **k)) or rollouts[-1]
    )
    calls = spy_policy_loss(monkeypatch)
    two = [{"type": "regex", "pattern": "v"}, {"type": "length", "weight": 0.1}]
    cfg = config(
        tmp_path,
        tiny_model_dir,
        data,
        rewards=two,
        max_steps=1,
        multi_reward="normalize_then_sum",
        overlong_cache=4,
        overlong_weight=0.5,
    )
    grpo.train(cfg)
    (rollout,) = rollouts
    penalty = overlong_penalty(torch.tensor(rollout.completion_lengths), max_length=8, cache=4)
    assert penalty.tolist() == [-1.0] * 16
    terms = torch.stack([rollout.source_scores["regex"], rollout.source_scores["length"], penalty], -1)
    expected = normalize_then_sum(terms, torch.tensor([1.0, 0.1, 0.5]), 4)
    ((_, _, advantages, _),) = calls
    torch.testing.assert_close(advantages, expected)
    assert train_metrics(cfg)[0]["overlong/penalty_mean"] == -1.0


def test_high_entropy_tokens_in_a_step(tmp_path, tiny_model_dir, monkeypatch):
    """top_entropy_fraction=0.25 over 2 minibatches x 2 micro-batches: one threshold for the step (the
    sampling policy's entropies), a quarter of the tokens kept, the first ratio still exactly 1."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    masks, real = [], grpo.high_entropy_tokens

    def spy(entropy, loss_mask, fraction, **kwargs):
        masks.append((entropy, loss_mask, *real(entropy, loss_mask, fraction, **kwargs)))
        return masks[-1][2:]

    monkeypatch.setattr(grpo, "high_entropy_tokens", spy)
    calls = spy_policy_loss(monkeypatch)
    cfg = config(
        tmp_path,
        tiny_model_dir,
        data,
        rewards=HAS_V,
        max_steps=1,
        top_entropy_fraction=0.25,
        minibatch_size=8,
        grad_accum=2,
    )
    grpo.train(cfg)
    ((entropy, loss_mask, mask, record),) = masks
    counted = loss_mask.bool()
    assert mask.sum() == pytest.approx(0.25 * counted.sum(), abs=1)  # ⌈ρ·M⌉, no ties in float entropies
    assert entropy[mask.bool()].min() >= entropy[counted & ~mask.bool()].max()
    assert train_metrics(cfg)[0]["entropy_tokens/frac_kept"] == record["entropy_tokens/frac_kept"]
    logps, old, _, loss_mask_mb = calls[0]
    assert torch.equal(logps[loss_mask_mb.bool()], old[loss_mask_mb.bool()])  # ratio exactly 1


def test_two_processes_decide_jointly_how_many_draws_a_step_makes(tmp_path, tiny_model_dir):
    """Dynamic sampling on 2 processes (torchrun, gloo), each with its own prompts and seeds, so each finds
    its own number of informative groups; with a reward normaliser, whose update gathers every process's
    scores at each draw, a process drawing again alone would wait for the other forever. Both make the
    same draws, end with the same parameters, and the step logs batch_size x 2 = 4 groups."""
    from tests.test_distributed import launch, ranks_agree_and_moved

    data = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "grpo"
    argv = [
        "grpo",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={out}",
        "rewards=[{type: regex, pattern: v}]",
        "batch_size=2",
        "num_generations=4",
        "generation.max_new_tokens=8",
        "max_steps=3",
        "lr=1e-2",
        "beta=0",
        "dynamic_sampling=true",
        "reward_normalize=true",
        "save_steps=0",
        "progress=false",
        "report=false",
        "mixed_precision=no",
    ]
    launch(out / "dump", argv)
    ranks_agree_and_moved(out / "dump", tiny_model_dir)
    draws = [json.loads((out / "dump" / f"rank{r}.online.json").read_text())["rollouts"] for r in (0, 1)]
    assert len(draws[0]) == len(draws[1]) > 3  # the same draws on both, some of them extra
    informative = [
        [int((~unanimous_groups(torch.tensor(d["scores"]), 4)).sum()) for d in rank] for rank in draws
    ]
    assert informative[0] != informative[1]  # the processes' own counts differ: the decision was joint
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in (m for m in lines if m["split"] == "train"):
        assert m["dynamic_sampling/groups_kept"] + m["dynamic_sampling/groups_topped_up"] == 4
    assert sum(m["dynamic_sampling/extra_rollouts"] for m in lines) == len(draws[0]) - 3
