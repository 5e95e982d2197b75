"""Offline RL from logged rewards: AWR weights and RAFT's filter by hand, rows validated, a tiny run that
favours the high-reward responses, the KL penalty against a copy, and bit-for-bit resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import interrupt_then_resume, train_metrics

from alignkit.algorithms import offline_rl
from alignkit.algorithms.offline_rl import row_weights
from alignkit.config.base import LoraSettings, ReferenceSettings
from alignkit.config.load import ConfigError
from alignkit.config.supervised import OfflineRLConfig
from alignkit.data.load import load_logged_rows
from alignkit.data.readers import DataError
from alignkit.losses.weighted import (
    advantages,
    awr_weights,
    effective_sample_size,
    raft_keep,
    weighted_nll,
)


def test_awr_weights_by_hand():
    """The worked example of `awr_weights`' docstring: rewards (1, 0, 2, −1), mean baseline 0.5, τ = 1,
    max_weight = e: w = (e^0.5, e^−0.5, e [clipped from e^1.5], e^−1.5), normalised to mean 1."""
    A = advantages(torch.tensor([1.0, 0.0, 2.0, -1.0]), [0, 1, 2, 3], "mean")
    assert A.tolist() == [0.5, -0.5, 1.5, -1.5]
    w = awr_weights(A, temperature=1.0, max_weight=math.e)
    raw = [math.exp(0.5), math.exp(-0.5), math.e, math.exp(-1.5)]
    expected = [x / (sum(raw) / 4) for x in raw]
    assert w.tolist() == pytest.approx(expected, rel=1e-12)
    assert w.tolist() == pytest.approx([1.2691, 0.4669, 2.0923, 0.1718], abs=1e-4)
    assert float(w.mean()) == pytest.approx(1.0)
    # τ -> ∞: every weight 1 (plain SFT); a huge A/τ cannot overflow (clipped before exp).
    assert awr_weights(A, 1e12, 20.0).tolist() == pytest.approx([1.0] * 4)
    assert torch.isfinite(awr_weights(torch.tensor([1e6, 0.0]), 1e-3, 20.0)).all()


def test_per_prompt_baseline_and_effective_sample_size_by_hand():
    """Prompt a has rewards 1 and 3 (baseline 2); prompt b is logged once, so it falls back to the
    overall mean (1 + 3 + 5) / 3 = 3."""
    A = advantages(torch.tensor([1.0, 3.0, 5.0]), ["a", "a", "b"], "prompt")
    assert A.tolist() == [-1.0, 1.0, 2.0]
    assert advantages(torch.tensor([1.0, 3.0]), ["a", "b"], "none").tolist() == [1.0, 3.0]
    assert effective_sample_size(torch.ones(5)) == pytest.approx(5.0)
    assert effective_sample_size(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([1.0, 3.0])) == pytest.approx(16 / 10)


def test_raft_keeps_exactly_the_expected_rows_with_ties():
    rewards = [0.5, 0.9, 0.9, 0.1, 0.7, 0.7, 0.7, 0.2]
    prompts = ["a", "a", "a", "a", "b", "b", "b", "b"]
    # Per prompt, top 0.5 = 2 of 4: a keeps rows 1, 2 (0.9, 0.9); b's three-way tie at 0.7 keeps the
    # two earliest rows, 4 and 5.
    assert raft_keep(rewards, prompts, 0.5) == [1, 2, 4, 5]
    # ceil(0.25 * 4) = 1 per prompt: the earlier of a's tied 0.9s.
    assert raft_keep(rewards, prompts, 0.25) == [1, 4]
    # Over all rows: ceil(0.3 * 8) = 3 -> 0.9, 0.9, then the first 0.7.
    assert raft_keep(rewards, [0] * 8, 0.3) == [1, 2, 4]
    assert raft_keep(rewards, [0] * 8, 1.0) == list(range(8))
    assert raft_keep([0.3], ["a"], 0.01) == [0]  # at least one row per group


def test_weighted_loss_does_not_depend_on_the_split():
    """A step's loss is Σ w·NLL / Σ tokens however its rows are cut into micro-batches (each micro-batch
    weighted by its tokens, as `optimizer_step` does)."""
    logps = torch.tensor([-3.0, -5.0, -2.0, -7.0])
    weights, tokens = torch.tensor([1.5, 0.2, 1.0, 1.3]), torch.tensor([3.0, 5.0, 1.0, 4.0])
    kl = torch.tensor([0.3, 0.1, 0.0, 0.2])
    whole = weighted_nll(logps, weights, tokens, kl, kl_coef=0.5)
    assert float(whole) == pytest.approx((1.5 * 3 + 0.2 * 5 + 2 + 1.3 * 7 + 0.5 * 0.6) / 13)
    halves = [slice(0, 1), slice(1, 4)]
    split = sum(
        weighted_nll(logps[s], weights[s], tokens[s], kl[s], kl_coef=0.5) * tokens[s].sum() for s in halves
    )
    assert float(split / tokens.sum()) == pytest.approx(float(whole))


def test_logged_rows_are_validated_with_file_line_field(tmp_path):
    path = tmp_path / "logged.jsonl"
    rows = [
        {"prompt": "Hi", "response": "there", "reward": 1},
        {"prompt": "Hi", "response": "there", "reward": "high"},
        {"prompt": "Hi", "reward": 0.5},
        {"prompt": "Hi", "response": "x"},
        {"prompt": "Hi", "response": "x", "reward": float("nan")},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_logged_rows(str(path))
    text = str(e.value)
    for line, key in ((2, "reward"), (3, "response"), (4, "reward"), (5, "reward")):
        assert f"logged.jsonl:{line}" in text and f"'{key}'" in text, (line, key)
    assert "logged.jsonl:1" not in text
    ok = load_logged_rows(str(path), skipped=[])
    assert [(r.prompt, r.completion, r.reward) for r in ok] == [("Hi", "there", 1.0)]


def write_logged(path, n_prompts: int = 8) -> str:
    """Two responses per prompt: a high-reward one about a cat and a low-reward one about rain."""
    rows = []
    for i in range(n_prompts):
        rows.append({"prompt": f"Tom went out {i}. It was", "response": " a happy cat.", "reward": 1.0})
        rows.append({"prompt": f"Tom went out {i}. It was", "response": " cold rain.", "reward": 0.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, model, data, **overrides) -> OfflineRLConfig:
    settings = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path),
        batch_size=4,
        lr=3e-3,
        max_steps=8,
        warmup_ratio=0.0,
        save_steps=0,
        progress=False,
        report=False,
        seed=0,
    )
    settings.update(overrides)
    return OfflineRLConfig(**settings)


def logp_gap(model_dir, tokenizer) -> float:
    """Per-token log-prob of the high-reward response minus the low-reward one, on one prompt."""
    from alignkit.data.collate import collate_sft
    from alignkit.logprobs.completion import completion_logps
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(str(model_dir))
    prompt = tokenizer("Tom went out 3. It was")["input_ids"]
    examples = [
        {"prompt_ids": prompt, "completion_ids": tokenizer(r, add_special_tokens=False)["input_ids"]}
        for r in (" a happy cat.", " cold rain.")
    ]
    batch = collate_sft(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    high, low = out.mean.tolist()
    return high - low


def test_awr_and_raft_raise_the_high_reward_responses_likelihood(tmp_path, tiny_model_dir, tokenizer):
    """The high-reward responses share a learnable feature; plain SFT on both moves the gap little, AWR
    (τ = 0.1) and RAFT (top half per prompt) raise the high-reward response's per-token log-likelihood
    relative to the low-reward one's by more than half a nat in 8 steps."""
    data = write_logged(tmp_path / "logged.jsonl")
    before = logp_gap(tiny_model_dir, tokenizer)
    gaps = {}
    for name, extra in {
        "awr": {"temperature": 0.1, "eval_data": data},
        "raft": {"method": "raft", "top_fraction": 0.5},
        "sft": {"temperature": 1e9},
    }.items():
        cfg = config(tmp_path / name, tiny_model_dir, data, lr=1e-2, **extra)
        final = offline_rl.train(cfg)
        gaps[name] = logp_gap(final, tokenizer) - before
        first = train_metrics(cfg)[0]
        if name == "raft":
            assert first["data/rows"] == 8 and first["data/reward_mean_trained"] == 1.0
        if name == "awr":  # A = ±0.5, τ = 0.1: e^5 clipped at max_weight 20, and e^-5; 8 rows of each
            a, b = 20.0, math.exp(-5)
            assert first["data/ess"] == pytest.approx(8 * (a + b) ** 2 / (a * a + b * b), rel=1e-6)
            assert first["data/weight_max"] == pytest.approx(2 * a / (a + b), rel=1e-6)
            # Evaluated on the same rows: the high-reward responses are now likelier per token.
            evals = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
            assert [e["logp_gap"] for e in evals if e["split"] == "eval"][-1] > 0.5
    assert gaps["awr"] > 0.5 and gaps["raft"] > 0.5, gaps  # measured: 0.87 and 1.10 nats per token
    assert abs(gaps["sft"]) < 0.25 * min(gaps["awr"], gaps["raft"]), gaps  # measured: -0.09


def test_kl_penalty_is_zero_at_the_start_and_holds_the_policy_closer(tmp_path, tiny_model_dir):
    data = write_logged(tmp_path / "logged.jsonl")
    kls = {}
    for coef in (0.01, 10.0):
        cfg = config(tmp_path / str(coef), tiny_model_dir, data, temperature=0.1, kl_coef=coef, lr=1e-2)
        offline_rl.train(cfg)
        lines = train_metrics(cfg)
        assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
        kls[coef] = lines[-1]["kl"]
    assert kls[10.0] < 0.5 * kls[0.01], kls


def test_kl_penalty_against_the_adapter_off_base_with_lora(tmp_path, tiny_model_dir):
    """reference.mode=adapter: the reference is the LoRA policy's base, so the KL starts at exactly 0
    (LoRA's B starts at 0) and grows as the adapter trains."""
    data = write_logged(tmp_path / "logged.jsonl")
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)
    cfg = config(tmp_path / "lora", tiny_model_dir, data, kl_coef=0.1, lr=1e-2, max_steps=4, lora=lora)
    cfg.reference = ReferenceSettings("adapter")
    offline_rl.train(cfg)
    kls = [m["kl"] for m in train_metrics(cfg)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[-1] > 1e-4, kls


def test_settings_a_method_would_ignore_are_refused():
    for bad in ({"top_fraction": 0.5}, {"method": "raft", "temperature": 0.5}):
        with pytest.raises(ConfigError, match="not used by method"):
            offline_rl.check_offline_settings(OfflineRLConfig(model="m", data="d", **bad))
    with pytest.raises(ConfigError, match="precomputed"):
        offline_rl.check_offline_settings(
            OfflineRLConfig(model="m", data="d", kl_coef=0.1, reference=ReferenceSettings("precomputed"))
        )


def test_raft_groups_responses_by_prompt_text(tmp_path, tiny_model_dir):
    examples = [
        {"prompt": "a", "prompt_ids": [1, 5 + i], "completion_ids": [7], "reward": r}
        for i, r in enumerate((0.2, 0.9, 0.4, 0.9))
    ]  # one prompt whose ids end differently with each response: still one group
    cfg = config(tmp_path, tiny_model_dir, "d", method="raft", top_fraction=0.5)
    kept, stats = row_weights(cfg, examples)
    assert [e["reward"] for e in kept] == [0.9, 0.9] and stats["data/ess"] == pytest.approx(2.0)


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch):
    data = write_logged(tmp_path / "logged.jsonl")
    whole = config(tmp_path / "a", tiny_model_dir, data, max_steps=6, kl_coef=0.1, grad_accum=2, batch_size=2)
    offline_rl.train(whole)
    expected = train_metrics(whole)

    cut = config(tmp_path / "b", tiny_model_dir, data, max_steps=6, kl_coef=0.1, grad_accum=2, batch_size=2)
    # Two micro-batches a step: the 7th collate is the first of step 4.
    resumed = interrupt_then_resume(offline_rl.train, cut, monkeypatch, offline_rl, "collate_weighted", 7)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(expected, resumed):
        same = {k: a[k] for k in a if not k.startswith(("step_time", "tokens/s", "data/"))}
        assert same == {k: b[k] for k in same}, a["step"]
