"""The off-policy correction end to end, with the loop sampler standing in for another engine: every
rollout carries sampler log-probs = the trainer's own + a known δ on every completion token, marked as not
the trainer's (what a vLLM rollout looks like, with a mismatch we choose). Then: correction none trains
exactly as today and logs the gap; log-probs equal to the trainer's give weights 1 and exactly today's run;
δ gives the weights, metrics and loss worked out by hand; GRPO takes π_old even with one update a step."""

from __future__ import annotations

import math

import pytest
import torch

import alignkit.algorithms.grpo as grpo
import alignkit.algorithms.online_dpo as online_dpo
import alignkit.algorithms.ppo as ppo
import alignkit.training.loop as online_loop
from alignkit.config.base import TrainConfig
from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError
from alignkit.logprobs.completion import token_logps
from tests.conftest import train_metrics, write_prompts
from tests.test_grpo import config as grpo_config
from tests.test_online_dpo import config as online_dpo_config
from tests.test_ppo import config as ppo_config


def sampler_reports(monkeypatch, delta, rollouts: list) -> None:
    """Make every rollout carry `sampler_logps` = the trainer's log-probs + `delta` (a number, or (N,): one
    per row) on each completion token (computed at collection as the trainer's pass computes them: one
    batch of every row, in order, at the sampling settings), marked `sampler_is_trainer=False`; delta
    None: no sampler log-probs (today's loop). Each rollout is appended to `rollouts`."""
    real = online_loop.collect

    def collect(model, tokenizer, prompt_ids, prompts, *, sampling, **kwargs):
        rollout = real(model, tokenizer, prompt_ids, prompts, sampling=sampling, **kwargs)
        if delta is not None:
            rows = list(range(rollout.input_ids.shape[0]))
            chunk = TrainConfig.logprob_chunk_size
            with torch.no_grad():
                out = token_logps(
                    model, rollout.batch(rows), chunk_size=chunk, with_entropy=False, **sampling.scoring()
                )
            mask = rollout.completion_mask.bool()
            shift = delta.reshape(-1, 1) if torch.is_tensor(delta) else delta
            rollout.sampler_logps = torch.where(mask, out["token_logps"].float() + shift, 0.0)
            rollout.sampler_is_trainer = False
        rollouts.append(rollout)
        return rollout

    monkeypatch.setattr(online_loop, "collect", collect)


def spy_batches(monkeypatch, module, seen: list) -> None:
    """Record the micro-batches of every optimizer step of `module`'s train loop."""
    real = module.optimizer_step

    def spy(*args, micro_batches, **kwargs):
        seen.append([dict(b) for b in micro_batches])
        return real(*args, micro_batches=micro_batches, **kwargs)

    monkeypatch.setattr(module, "optimizer_step", spy)


def same_run(metrics: list[dict]) -> list[dict]:
    """The metrics that say what was trained (not timings, not the sampler's gap)."""
    return [
        {k: v for k, v in m.items() if not k.startswith(("sampler/", "time/", "tokens/s"))} for m in metrics
    ]


def run(monkeypatch, train, cfg, delta):
    rollouts, seen = [], []
    with monkeypatch.context() as patch:
        sampler_reports(patch, delta, rollouts)
        spy_batches(patch, {grpo.train: grpo, ppo.train: ppo, online_dpo.train: online_dpo}[train], seen)
        train(cfg)
    return train_metrics(cfg), rollouts, seen


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_no_correction_and_an_exact_sampler_train_exactly_as_today(
    tmp_path, tiny_model_dir, monkeypatch, algorithm
):
    """Three 2-step runs from the same seed: today's (no sampler log-probs); a sampler 0.2 nats above the
    trainer on every token with sampler_correction=none; a sampler equal to the trainer, marked as another
    engine, with the default auto (= sequence_mask at 3). All three train the same bits. The gap is logged
    where it exists: |Δ| = 0.2 and k3 = e^−0.2 − 1 + 0.2 = 0.018731 per token (Δ = old − sampler = −0.2);
    0 and 0 for the exact sampler, whose weights are exactly 1 on every completion token."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    train, config = (grpo.train, grpo_config) if algorithm == "grpo" else (ppo.train, ppo_config)
    overrides = (
        {"max_steps": 2} if algorithm == "grpo" else {"max_steps": 2, "batch_size": 4, "ppo_epochs": 2}
    )
    today, _, _ = run(monkeypatch, train, config(tmp_path / "a", tiny_model_dir, data, **overrides), None)
    cfg = config(tmp_path / "b", tiny_model_dir, data, sampler_correction="none", **overrides)
    uncorrected, _, seen = run(monkeypatch, train, cfg, 0.2)
    exact, rollouts, seen_exact = run(
        monkeypatch, train, config(tmp_path / "c", tiny_model_dir, data, **overrides), 0.0
    )

    assert same_run(uncorrected) == same_run(today) == same_run(exact)
    assert not any(k.startswith("sampler/") for k in today[0])
    for m in uncorrected:
        assert m["sampler/logp_diff/mean"] == pytest.approx(0.2, abs=1e-5)
        assert m["sampler/kl"] == pytest.approx(math.exp(-0.2) - 1 + 0.2, abs=1e-5)
        assert "sampler/weights/mean" not in m  # no correction, no weights
    assert all("sampler_weights" not in b for step in seen for b in step)
    for m in exact:
        assert m["sampler/logp_diff/max"] == 0.0 and m["sampler/kl"] == 0.0
        assert m["sampler/weights/min"] == m["sampler/weights/max"] == 1.0 and m["sampler/frac_masked"] == 0.0
    for step in seen_exact:
        for b in step:
            assert torch.equal(b["sampler_weights"], b["completion_mask"].float())


def test_grpo_weights_metrics_and_loss_by_hand(tmp_path, tiny_model_dir, monkeypatch):
    """One GRPO step, one update (ppo_epochs 1, the whole rollout as one minibatch: the on-policy case that
    today takes no pass for π_old), correction auto, and a sampler below the trainer by d_i = 0.02·i nats
    on every token of completion i (i = 0..15).

    GRPO now takes π_old (the sampler is not the trainer): the batch carries old_logps = sampler + d_i.
    auto = sequence_mask at C = 3: completion i of L_i tokens has R_i = e^(d_i·L_i), and w_i = R_i where
    R_i <= 3, else 0, on each of its tokens. With every L_i = 10 (the random policy never stops early),
    R_i = e^(0.2·i): kept for i <= 5 (e^1.0 = 2.718), masked from i = 6 (e^1.2 = 3.320), so
    frac_masked = 10/16, weights min 0, max e^1.0, mean (1 + e^0.2 + ... + e^1.0) / 16 = 0.6549.
    The gap per token: logp_diff/mean = Σ_i L_i·d_i / Σ_i L_i = 0.15, logp_diff/max = 0.30, and
    kl = Σ_i L_i·(e^d_i − 1 − d_i) / Σ_i L_i. At ratio 1 each token's clipped surrogate is −A_i, so with
    GRPO's sequence mean (β = 0) the loss is −mean_i(A_i·w_i)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = grpo_config(
        tmp_path, tiny_model_dir, data, max_steps=1, generation=GenerationSettings(max_new_tokens=10)
    )
    d = 0.02 * torch.arange(16.0)
    metrics, rollouts, seen = run(monkeypatch, grpo.train, cfg, -d)
    (rollout,), ((batch,),), (m,) = rollouts, seen, metrics

    L = torch.tensor(rollout.completion_lengths, dtype=torch.float32)
    ratios = torch.exp(d * L)
    w = torch.where(ratios <= 3, ratios, torch.zeros_like(ratios))
    if torch.equal(L, torch.full((16,), 10.0)):  # the numbers of the docstring
        assert float(w.mean()) == pytest.approx(sum(math.exp(0.2 * i) for i in range(6)) / 16, rel=1e-6)
    assert 0 < (w > 0).sum() < 16, L  # both kept and masked completions
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(batch["sampler_weights"], w[:, None] * mask)
    torch.testing.assert_close(batch["old_logps"], torch.where(mask, rollout.sampler_logps + d[:, None], 0.0))
    assert m["sampler/logp_diff/mean"] == pytest.approx(float((L * d).sum() / L.sum()), abs=1e-5)
    assert m["sampler/logp_diff/max"] == pytest.approx(0.30, abs=1e-5)
    kl = (L * (torch.exp(d) - 1 - d)).sum() / L.sum()
    assert m["sampler/kl"] == pytest.approx(float(kl), abs=1e-6)
    assert m["sampler/weights/mean"] == pytest.approx(float(w.mean()), rel=1e-5)
    assert m["sampler/weights/min"] == 0.0
    assert m["sampler/weights/max"] == pytest.approx(float(w.max()), rel=1e-5)
    assert m["sampler/frac_masked"] == pytest.approx(float((w == 0).float().mean()))
    assert m["loss"] == pytest.approx(float(-(batch["advantages"] * w).mean()), abs=1e-5)


def test_ppo_token_mask_weights_the_policy_loss_only(tmp_path, tiny_model_dir, monkeypatch):
    """One PPO step, one epoch (its update at ratio 1), sampler_correction=token_mask at C = 1.1, and a
    sampler below the trainer by d_i = 0.02·i nats on every token of completion i (i = 0..7).

    Each token of completion i has ratio e^(d_i): kept for i <= 4 (e^0.08 = 1.083), masked from i = 5
    (e^0.10 = 1.105 > 1.1): w_t = e^(d_i) or 0. The token is the unit: frac_masked = Σ_{i>=5} L_i / Σ_i L_i.
    At ratio 1 the clipped surrogate is −A_t, so policy_loss = −Σ_t A_t·w_t / Σ_t 1 over the completion
    tokens, while the value loss is not weighted: ½(V_old − R)², V = V_old on the first update, averaged
    over every completion token, masked ones included."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = ppo_config(
        tmp_path,
        tiny_model_dir,
        data,
        max_steps=1,
        ppo_epochs=1,
        sampler_correction="token_mask",
        sampler_correction_cap=1.1,
    )
    d = 0.02 * torch.arange(8.0)
    metrics, rollouts, seen = run(monkeypatch, ppo.train, cfg, -d)
    (rollout,), ((batch,),), (m,) = rollouts, seen, metrics

    mask = batch["completion_mask"].bool()
    ratios = torch.exp(d)[:, None].expand_as(mask)
    w = torch.where(mask & (ratios <= 1.1), ratios, torch.zeros_like(ratios))
    torch.testing.assert_close(batch["sampler_weights"], w)
    torch.testing.assert_close(batch["old_logps"], torch.where(mask, rollout.sampler_logps + d[:, None], 0.0))
    L = mask.sum(-1).float()
    assert m["sampler/frac_masked"] == pytest.approx(float(L[5:].sum() / L.sum()))
    assert m["sampler/weights/min"] == 0.0
    assert m["sampler/weights/max"] == pytest.approx(math.exp(0.08), rel=1e-5)
    assert m["sampler/weights/mean"] == pytest.approx(float(w[mask].mean()), rel=1e-5)
    A = batch["advantages"]
    assert m["policy_loss"] == pytest.approx(float(-(A * w)[mask].sum() / mask.sum()), abs=1e-5)
    value_loss = 0.5 * (batch["old_values"] - batch["returns"]).square()[mask].mean()
    assert m["value_loss"] == pytest.approx(float(value_loss), rel=1e-5)


def test_a_correction_asked_for_with_the_loop_sampler_weighs_by_about_one(tmp_path, tiny_model_dir):
    """The loop reports its log-probs too (the trainer's own, up to rounding): a correction asked for by
    name takes π_old even fully on-policy and logs the gap, which is rounding, and weights of 1."""
    from conftest import train_metrics

    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = grpo_config(tmp_path, tiny_model_dir, data, max_steps=2, sampler_correction="token_truncate")
    grpo.train(cfg)
    for record in train_metrics(cfg):
        assert record["sampler/logp_diff/max"] < 1e-4, record
        assert abs(record["sampler/weights/mean"] - 1) < 1e-4, record


def test_online_dpo_logs_the_gap_and_trains_as_today(tmp_path, tiny_model_dir, monkeypatch):
    """Online DPO has no ratio to correct: with a sampler 0.2 nats above the trainer it trains the same bits
    as today and logs the gap, |Δ| = 0.2 and k3 = e^−0.2 − 1 + 0.2 per token, from a pass at the sampling
    distribution (τ = 0.7 here: the trainer's log-probs at τ = 1 would be another distribution's)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    today, _, _ = run(
        monkeypatch,
        online_dpo.train,
        online_dpo_config(
            tmp_path / "a",
            tiny_model_dir,
            data,
            max_steps=2,
            generation=GenerationSettings(max_new_tokens=8, temperature=0.7),
        ),
        None,
    )
    cfg = online_dpo_config(
        tmp_path / "b",
        tiny_model_dir,
        data,
        max_steps=2,
        generation=GenerationSettings(max_new_tokens=8, temperature=0.7),
    )
    shifted, _, seen = run(monkeypatch, online_dpo.train, cfg, 0.2)
    # The entropy alarm's estimate, −mean log p of the sampled tokens, reads the sampler's own log-probs
    # (online DPO takes no trainer entropy): a sampler 0.2 nats above the trainer lowers it by exactly 0.2.
    key = "alarm_stats/entropy_collapse/entropy"
    for a, b in zip(shifted, today):
        assert a.pop(key) - b.pop(key) == pytest.approx(-0.2, abs=1e-5)
    assert same_run(shifted) == same_run(today)
    assert seen and all("sampler_weights" not in b for step in seen for b in step)
    for m in shifted:
        assert m["sampler/logp_diff/mean"] == pytest.approx(0.2, abs=1e-5)
        assert m["sampler/kl"] == pytest.approx(math.exp(-0.2) - 1 + 0.2, abs=1e-5)
        assert not any(k.startswith("sampler/weights") for k in m)


@pytest.mark.parametrize("setting", [{"sampler_correction": "token_mask"}, {"sampler_correction_cap": 2.0}])
def test_online_dpo_refuses_a_correction(tmp_path, setting):
    cfg = online_dpo_config(tmp_path, tmp_path / "no-model", str(tmp_path / "no-data.jsonl"), **setting)
    with pytest.raises(ConfigError, match="online DPO has no such loss"):
        online_dpo.train(cfg)


def test_the_figures_are_the_whole_steps_over_every_process():
    """rollout.sampler_correction reduces what `gather` returns (every process's tokens and completions),
    not this process's share, while the weights stay this process's. This process: two completions, Δ =
    (0.1, 0.1) and (0.3,): R = e^0.2 = 1.2214 and e^0.3 = 1.3499. The other (a stand-in gather): one
    completion of three tokens at Δ = 0.5: R = e^1.5 = 4.48 > 3, masked by auto = sequence_mask.
    Whole step: |Δ| mean (0.1 + 0.1 + 0.3 + 3·0.5) / 6 = 1/3, max 0.5; weights (1.2214, 1.3499, 0): mean
    0.8571, min 0, max 1.3499; frac_masked 1/3 (this process alone: 0.1667, 0.3, 1.2856, 1.2214, 0)."""
    from types import SimpleNamespace

    from alignkit.rollout import sampler_correction

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    sampler = torch.tensor([[-0.1, -0.1, 0.0], [-0.3, 0.0, 0.0]])
    rollout = SimpleNamespace(
        sampler_logps=sampler,
        sampler_is_trainer=False,
        sampler_auto_correction="sequence_mask",  # (what a vLLM sampler asks auto for)
        completion_mask=mask,
        old_logps=torch.zeros(2, 3),
        sampler_details={},
    )
    other_tokens, other_ratios = torch.full((3,), 0.5), torch.tensor([math.exp(1.5)])

    def gather(x):  # (this process's 3 tokens or 2 completions) -> the step's, in rank order
        return torch.cat([x, other_tokens if x.numel() == 3 else other_ratios])

    weights, m = sampler_correction(rollout, "auto", 3.0, gather=gather)
    e2, e3 = math.exp(0.2), math.exp(0.3)
    torch.testing.assert_close(weights["sampler_weights"], torch.tensor([[e2, e2, 0], [e3, 0, 0]]))
    assert m == pytest.approx(
        {
            "sampler/logp_diff/mean": 1 / 3,
            "sampler/logp_diff/max": 0.5,
            "sampler/kl": (2 * (math.exp(0.1) - 1.1) + (e3 - 1.3) + 3 * (math.exp(0.5) - 1.5)) / 6,
            "sampler/weights/mean": (e2 + e3) / 3,
            "sampler/weights/min": 0.0,
            "sampler/weights/max": e3,
            "sampler/frac_masked": 1 / 3,
        },
        abs=1e-6,
    )
