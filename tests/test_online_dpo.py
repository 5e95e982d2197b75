"""alignkit online-dpo: the first step's loss is ln 2 (policy = reference), a tiny policy learns a learnable
reward from its own judged samples, a step whose samples all tie trains nothing, a pairwise judge ranks the
samples, resume reproduces the run, and settings are checked before anything loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import alignkit.algorithms.online_dpo as online_dpo
from alignkit.algorithms.online_dpo import pair_sums
from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError
from alignkit.config.online import OnlineDPOConfig
from tests.conftest import train_metrics, write_prompts
from tests.test_iterative import E_COUNT, lines, untimed


def config(tmp_path, model, data, **overrides) -> OnlineDPOConfig:
    base = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / "out"),
        rewards=E_COUNT,
        batch_size=4,
        num_generations=4,
        generation=GenerationSettings(max_new_tokens=8),
        lr=1e-2,
        save_steps=0,
        eval_steps=1000,
        progress=False,
        report=False,
        seed=1,
    )
    base.update(overrides)
    return OnlineDPOConfig(**base)


def test_pair_sums_split_chosen_and_rejected_rows():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]])
    out = pair_sums(values, mask)
    assert out["chosen"].tolist() == [5.0, 6.0] and out["rejected"].tolist() == [1.5, 1.0]
    assert out["n_chosen"].tolist() == [2.0, 1.0] and out["n_rejected"].tolist() == [3.0, 1.0]


def test_a_tiny_policy_learns_from_its_own_judged_samples(tmp_path, tiny_model_dir):
    """First step: the policy is its reference, so the DPO loss is ln 2 and every margin 0. Then the reward
    ('e's per 8-token completion) rises; measured over seeds 1-3 at lr 3e-2, 30 steps: the mean of the last 5
    steps beat the first 5 by +3.5..+7.4 (the test, seed 1, asks +1.5)."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=30, lr=3e-2)
    online_dpo.train(cfg)
    records = train_metrics(cfg)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 1.5, rewards
    assert all(r["pairs/pairs"] + r["pairs/below_gap"] == 4 for r in records)


def test_a_step_whose_samples_all_tie_takes_no_update(tmp_path, tiny_model_dir):
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    constant = [{"type": "regex", "pattern": "^", "mode": "search"}]  # 1.0 for every completion
    cfg = config(tmp_path, tiny_model_dir, data, rewards=constant, max_steps=2)
    final = online_dpo.train(cfg)
    records = train_metrics(cfg)
    assert [(r["pairs/pairs"], r["pairs/below_gap"]) for r in records] == [(0.0, 4.0), (0.0, 4.0)]
    assert "loss" not in records[0]
    before, after = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(final / "model.safetensors")),
    )
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_pairwise_judge_ranks_the_samples(tmp_path, tiny_model_dir, monkeypatch):
    """A stand-in judge preferring the text with more 'e's ranks the samples; `rewards` then only score the
    eval prompts, whose 'e' count rises as with the reward itself (measured, seeds 1-3: the mean of the
    last 5 evals beat the first 5 by +4.2..+26.3; the test, seed 1, asks +1.0)."""

    class MoreEs:
        def compare(self, prompts, a, b):
            return torch.tensor(
                [
                    0.5 if x.count("e") == y.count("e") else float(x.count("e") > y.count("e"))
                    for x, y in zip(a, b)
                ]
            )

        def metrics(self):
            return {}

    monkeypatch.setattr(online_dpo, "build_reward", lambda spec, where: MoreEs())
    data = write_prompts(tmp_path / "prompts.jsonl", 24)
    judge = {"type": "judge", "template": "pairwise", "backend": "http", "model": "m"}
    cfg = config(
        tmp_path, tiny_model_dir, data, judge=judge, max_steps=30, lr=3e-2, eval_fraction=1 / 3, eval_steps=1
    )
    online_dpo.train(cfg)
    records = train_metrics(cfg)
    # The win rates of a prompt's 4 completions sum to 2 (each of the 6 games hands out one win).
    assert all(r["reward"] == pytest.approx(0.5) for r in records)
    evals = [r["reward"] for r in eval_metrics(cfg)]
    assert len(evals) == 30 and sum(evals[-5:]) / 5 > sum(evals[:5]) / 5 + 1.0, evals


def eval_metrics(cfg) -> list[dict]:
    return [r for r in lines(Path(cfg.output_dir) / "metrics.jsonl") if r["split"] == "eval"]


def test_log_probs_are_the_policys_own_at_temperature_1_however_it_samples(
    tmp_path, tiny_model_dir, monkeypatch
):
    """One convention with iterative-dpo (whose rounds are offline DPO) and TRL's OnlineDPOTrainer: DPO's
    implicit reward β·log(π/π_ref) is of the policy and the reference themselves, at temperature 1 and
    untruncated; `temperature`, `top_k`, `top_p` only shape the samples that become pairs. Sampling at
    τ = 0.5 with top_p = 0.9, the reference's log-probs of the pairs and the policy's in the first update
    (still the starting weights) both equal log_softmax of the starting model's logits; the first loss is
    ln 2. (Before, both were taken at τ = 0.5: up to 0.24 nats per token off here.)"""
    from transformers import AutoModelForCausalLM

    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    seen = {}
    real_pass, real_logps = online_dpo.token_logps_in_batches, online_dpo.token_logps

    def spy_pass(forward, rollout, *args, **kwargs):
        out = real_pass(forward, rollout, *args, **kwargs)
        seen.setdefault("reference", (rollout.input_ids, rollout.completion_mask, out["token_logps"]))
        return out

    def spy_logps(model, batch, **kwargs):
        out = real_logps(model, batch, **kwargs)
        seen.setdefault("policy", (batch["input_ids"], batch["completion_mask"], out["token_logps"].detach()))
        return out

    monkeypatch.setattr(online_dpo, "token_logps_in_batches", spy_pass)
    monkeypatch.setattr(online_dpo, "token_logps", spy_logps)
    sampling = GenerationSettings(max_new_tokens=8, temperature=0.5, top_p=0.9)
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=1, generation=sampling)
    online_dpo.train(cfg)
    assert train_metrics(cfg)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for who, (ids, completion_mask, logps) in seen.items():
        with torch.no_grad():
            logits = start(input_ids=ids.cpu()).logits[:, :-1].float()  # (right padding: causal, unread)
        own = logits.log_softmax(-1).gather(-1, ids.cpu()[:, 1:, None])[..., 0]
        mask = completion_mask.cpu()[:, 1:].bool()
        mask &= (logps.cpu()[:, 1:] != 0).any(-1, keepdim=True)  # the reference scores the pairs' rows only
        assert mask.any(-1).sum() >= 2  # at least one pair's two rows

        def named(message: str, who: str = who) -> str:
            return f"{who}: {message}"

        torch.testing.assert_close(logps.cpu()[:, 1:][mask], own[mask], atol=2e-5, rtol=0, msg=named)
    assert set(seen) == {"reference", "policy"}


def test_an_interrupted_run_resumes_to_the_same_metrics(tmp_path, tiny_model_dir, monkeypatch):
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    whole = config(
        tmp_path, tiny_model_dir, data, max_steps=6, save_steps=3, output_dir=str(tmp_path / "whole")
    )
    online_dpo.train(whole)
    real, calls = online_dpo.optimizer_step, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(online_dpo, "optimizer_step", crash)
    cut = config(tmp_path, tiny_model_dir, data, max_steps=6, save_steps=3, output_dir=str(tmp_path / "cut"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        online_dpo.train(cut)
    monkeypatch.setattr(online_dpo, "optimizer_step", real)
    online_dpo.train(
        config(
            tmp_path,
            tiny_model_dir,
            data,
            max_steps=6,
            save_steps=3,
            output_dir=str(tmp_path / "cut"),
            resume=True,
        )
    )
    assert untimed(tmp_path / "cut" / "metrics.jsonl") == untimed(tmp_path / "whole" / "metrics.jsonl")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rewards": []}, "rewards is empty"),
        ({"gap_as": "margin", "loss": "ipo"}, "only loss=sigmoid"),
        ({"ppo_epochs": 2}, "one update per rollout"),
        ({"epsilon": 0.1}, "clipped-ratio"),
        ({"label_smoothing": 0.1, "loss": "ipo"}, "not used by loss 'ipo'"),
        ({"num_generations": 1}, "num_generations"),
        ({"reference": {"mode": "precomputed"}}, "precomputed does not apply"),
    ],
)
def test_settings_are_checked_before_anything_loads(tmp_path, overrides, message):
    from alignkit.config.load import from_mapping

    cfg = config(tmp_path, tmp_path / "no-model", str(tmp_path / "no-data.jsonl"))
    for key, value in overrides.items():
        setattr(cfg, key, from_mapping(type(cfg.reference), value) if key == "reference" else value)
    with pytest.raises(ConfigError, match=message):
        online_dpo.train(cfg)
