"""`alignkit eval` and alignkit.evaluation.compare's comparison: shared seeds, win rate, percent change, KL, reports."""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import alignkit
from alignkit.cli import main
from alignkit.config.tools import EvalConfig
from alignkit.data.readers import DataError
from alignkit.evaluation.command import read_prompts
from alignkit.evaluation.compare import compare_policies, format_markdown
from alignkit.evaluation.stats import percent_change, score_stats, win_rate
from alignkit.generation.sampling import sample
from alignkit.models.load import load_causal_lm
from alignkit.rewards import RewardSet

TINYSTORIES = Path(alignkit.__file__).parent / "assets" / "tinystories-656k"
HELDOUT = Path(alignkit.__file__).parent / "assets" / "demo" / "heldout_openings.json"
PROMPTS = [
    "Once upon a time, there was a little dog named Max. One day, he ",
    "Lily ",
    "Tom and Sue went to the park. They saw a big ",
    "Once upon a time, in a big forest, there lived a small rabbit named Ben. He ",
]


@pytest.fixture(scope="module")
def stories(tokenizer):
    """The shipped, trained TinyStories-656K."""
    return load_causal_lm(str(TINYSTORIES), pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def random_model(tiny_model_dir, tokenizer):
    """A randomly initialised tiny Llama with the same tokenizer: nearly uniform next-token distributions."""
    return load_causal_lm(str(tiny_model_dir), pad_token_id=tokenizer.pad_token_id)


def sequence_logp(model, s) -> float:
    """Σ_t log p(y_t | prompt, y_<t) of one sample, from one unbatched forward and a full log_softmax."""
    row = torch.tensor([s.prompt_ids + s.completion_ids])
    with torch.no_grad():
        logps = model(row).logits[0, :-1].float().log_softmax(-1)  # (T - 1, V)
    token_logps = logps.gather(-1, row[0, 1:, None])[:, 0]  # (T - 1,)
    return token_logps[len(s.prompt_ids) - 1 :].sum().item()


def test_percent_change_is_after_minus_before_over_abs_before():
    """(after - before) / |before| x 100, positive when the score rose (the issue's (before - after) / before
    is its negative for positive scores): 0.2 -> 0.3 is +50%; -0.5 -> -0.25 rose by half of |-0.5|: +50%;
    2 -> 1 is -50%; 0 -> 0 is 0; 0 -> 1 is undefined."""
    assert percent_change(0.2, 0.3) == pytest.approx(50.0)
    assert percent_change(-0.5, -0.25) == pytest.approx(50.0)
    assert percent_change(2.0, 1.0) == pytest.approx(-50.0)
    assert percent_change(0.0, 0.0) == 0.0 and percent_change(0.0, 1.0) is None


def test_win_rate_and_score_stats_by_hand():
    """n = 2 samples per prompt, prompt-major. base [1, 2 | 3, 3 | 0, 5 | 0, 0] has prompt means
    [1.5, 3, 2.5, 0]; aligned [2, 2 | 3, 3 | 1, 1 | 1, 0] has [2, 3, 1, 0.5]: win, tie, loss, win ->
    (1 + 0.5 + 0 + 1) / 4 = 0.625.

    score_stats([1, 3, 2, 6], n=2): mean 3; std over all four sqrt((4 + 0 + 1 + 9) / 3) = sqrt(14/3);
    prompt means [2, 4], whose std is sqrt(2), so the standard error over prompts is sqrt(2) / sqrt(2) = 1.
    """
    base = torch.tensor([1.0, 2.0, 3.0, 3.0, 0.0, 5.0, 0.0, 0.0])
    aligned = torch.tensor([2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 1.0, 0.0])
    assert win_rate(base, aligned, 2) == 0.625
    assert win_rate(aligned, base, 2) == 0.375 and win_rate(base, base, 2) == 0.5

    stats = score_stats(torch.tensor([1.0, 3.0, 2.0, 6.0]), 2)
    assert stats["mean"] == 3.0 and stats["std"] == pytest.approx(math.sqrt(14 / 3))
    assert stats["stderr"] == pytest.approx(1.0)
    assert score_stats(torch.tensor([1.0, 3.0]), 2)["stderr"] is None  # one prompt: no s.e. over prompts


def test_a_model_compared_with_itself_changes_nothing(stories, tokenizer):
    """Two separately loaded copies of one model, sampled with the same seeds, write the same samples and
    score them the same: every difference, its s.e., the KL and the percent change are exactly 0 and every
    win rate is exactly 1/2 (all prompts tie)."""
    copy = load_causal_lm(str(TINYSTORIES), pad_token_id=tokenizer.pad_token_id)
    rewards = RewardSet.from_specs(
        [
            {"type": "vader"},
            {"type": "length"},
            {"type": "regex", "name": "the", "pattern": r"\bthe\b", "flags": "i", "mode": "count"},
        ]
    )
    report = compare_policies(
        stories, copy, tokenizer, PROMPTS, rewards=rewards, num_samples=3, max_new_tokens=16, seed=3
    )
    assert list(report["rewards"]) == ["vader", "length", "the"] and "total" in report
    assert report["rewards"]["length"]["base"]["mean"] > 0  # so 0% is (a - b) / |b|, not the 0 -> 0 case
    for r in [*report["rewards"].values(), report["total"]]:
        assert r["base"] == r["aligned"]
        assert r["difference"] == 0.0 and r["difference_stderr"] == 0.0
        assert r["percent_change"] == 0.0 and r["win_rate"] == 0.5
    assert report["kl"]["mean"] == 0.0 and report["kl"]["per_token"] == 0.0
    assert report["base"] == report["aligned"]
    assert all(
        e["base"] == e["aligned"] and e["base_scores"] == e["aligned_scores"] for e in report["examples"]
    )


def test_kl_is_the_mean_log_ratio_on_the_aligned_samples(stories, random_model, tokenizer):
    """base = a random tiny Llama, aligned = the trained TinyStories model. For every aligned sample y the
    test computes log p_aligned(y) - log p_base(y) from full unbatched forwards; the report's KL is their
    mean, and it is positive, as KL(aligned || base) must be: the random model spreads its mass almost
    uniformly over 2048 tokens (about log 2048 = 7.6 nats per token), while the trained model's own samples
    cost it a few nats per token. The base model's perplexity of the aligned samples is
    exp(-Σ log p_base / tokens) over the same samples."""
    rewards = RewardSet.from_specs([{"type": "length"}])
    settings = dict(num_samples=2, max_new_tokens=12, seed=5)
    report = compare_policies(random_model, stories, tokenizer, PROMPTS, rewards=rewards, **settings)

    samples = sample(stories, tokenizer, PROMPTS, **settings)
    aligned_logps = [sequence_logp(stories, s) for s in samples]
    base_logps = [sequence_logp(random_model, s) for s in samples]
    ratios = [a - b for a, b in zip(aligned_logps, base_logps)]
    tokens = sum(len(s.completion_ids) for s in samples)
    assert report["kl"]["mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
    assert report["kl"]["per_token"] == pytest.approx(sum(ratios) / tokens, rel=1e-4)
    assert report["kl"]["mean"] > 0 and report["kl"]["per_token"] > 2.0
    assert report["aligned"]["base_model_perplexity"] == pytest.approx(
        math.exp(-sum(base_logps) / tokens), rel=1e-4
    )
    assert report["aligned"]["mean_tokens"] == tokens / len(samples)


def test_win_rate_difference_and_change_by_hand_on_rule_based_sources(stories, random_model, tokenizer):
    """Characters per completion and a 0.5-weighted count of 'the', recomputed from the samples: per-prompt
    means, wins (ties ½), the paired difference and its s.e. over prompts, the percent change and the
    total (= chars + 0.5 x count per sample)."""
    rewards = RewardSet.from_specs(
        [
            {"type": "length", "name": "chars", "unit": "chars"},
            {
                "type": "regex",
                "name": "the",
                "pattern": r"\bthe\b",
                "flags": "i",
                "mode": "count",
                "weight": 0.5,
            },
        ]
    )
    settings = dict(num_samples=3, max_new_tokens=10, seed=2)
    report = compare_policies(random_model, stories, tokenizer, PROMPTS, rewards=rewards, **settings)
    texts = {
        "base": [s.text for s in sample(random_model, tokenizer, PROMPTS, **settings)],
        "aligned": [s.text for s in sample(stories, tokenizer, PROMPTS, **settings)],
    }
    n, P = 3, len(PROMPTS)

    def by_hand(score):
        values = {side: [score(t) for t in texts[side]] for side in texts}
        means = {side: [sum(v[i * n : (i + 1) * n]) / n for i in range(P)] for side, v in values.items()}
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(means["aligned"], means["base"]))
        before, after = sum(values["base"]) / (n * P), sum(values["aligned"]) / (n * P)
        d = [a - b for a, b in zip(means["aligned"], means["base"])]  # per-prompt paired differences
        d_mean = sum(d) / P
        d_se = math.sqrt(sum((x - d_mean) ** 2 for x in d) / (P - 1) / P)
        return before, after, wins / P, d_se

    def count_the(text):
        return len(re.findall(r"\bthe\b", text, re.IGNORECASE))

    for name, score in (("chars", len), ("the", count_the), ("total", lambda t: len(t) + 0.5 * count_the(t))):
        r = report["total"] if name == "total" else report["rewards"][name]
        before, after, wins, d_se = by_hand(score)
        assert r["base"]["mean"] == pytest.approx(before) and r["aligned"]["mean"] == pytest.approx(after)
        assert r["win_rate"] == wins
        assert r["difference"] == pytest.approx(after - before)
        assert r["difference_stderr"] == pytest.approx(d_se)
        if before:
            assert r["percent_change"] == pytest.approx((after - before) / abs(before) * 100)


def test_bad_prompt_rows_are_reported_as_file_line_field(tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "Once upon a time"}\n{"prompt": 3}\n\n{"text": "Lily"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError) as err:
        read_prompts(str(rows))
    message = str(err.value)
    assert f"{rows}:2: field 'prompt': found number (expected a string or a list of messages)" in message
    assert (
        f"{rows}:4: field 'prompt': missing (expected a string or a list of messages; found keys ['text'])"
        in message
    )
    assert f"{rows}:5: field 'prompt': empty" in message
    assert (err.value.line, err.value.field, err.value.count) == (2, "prompt", 3)

    strings = tmp_path / "prompts.json"
    strings.write_text('["Once upon a time", 7]')
    with pytest.raises(DataError, match=rf"{strings}:2: found a JSON number \(expected a prompt string\)"):
        read_prompts(str(strings))
    assert read_prompts(str(HELDOUT)) == json.loads(HELDOUT.read_text())


def test_cli_writes_both_reports(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "eval"
    args = [
        "eval",
        f"base_model={tiny_model_dir}",
        f"model={TINYSTORIES}",
        f"prompts={prompts}",
        "num_samples=2",
        "generation.max_new_tokens=8",
        "num_examples=2",
        f"output_dir={out}",
        "rewards=[{type: vader}, {type: length}]",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval_report.json").read_text())
    markdown = (out / "eval_report.md").read_text()
    assert markdown in printed and format_markdown(report) == markdown  # the JSON holds everything shown
    assert report["settings"]["num_prompts"] == 3 and report["settings"]["num_samples"] == 2
    assert list(report["rewards"]) == ["vader", "length"] and "total" in report
    assert report["config"]["rewards"] == [{"type": "vader"}, {"type": "length"}]
    assert report["config"]["generation"]["backend"] == "hf"  # auto, resolved: eval samples through generate
    assert report["models"] == {"base": str(tiny_model_dir), "aligned": str(TINYSTORIES)}
    assert len(report["examples"]) == 2 and report["kl"]["mean"] > 0
    for row in ("| vader |", "| length |", "| total |", "| base-model perplexity |", "KL(aligned ‖ base)"):
        assert row in markdown


def test_cli_rejects_bad_settings_before_loading_a_model(tmp_path, capsys):
    """The model paths do not exist: loading one would raise OSError, not give these messages."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Once"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Once"}\n{"prompt": ["Lily"]}\n')
    models = ["base_model=/nonexistent/base", "model=/nonexistent/aligned"]

    assert main(["eval", *models, f"prompts={good}", "rewards=[{type: vadr}]"]) == 1
    assert "rewards[0]: unknown reward type 'vadr'. Did you mean 'vader'?" in capsys.readouterr().err
    assert main(["eval", *models, f"prompts={good}", "rewards=[{type: length, unit: lines}]"]) == 1
    assert "rewards[0]" in capsys.readouterr().err
    assert main(["eval", *models, f"prompts={bad}"]) == 1
    message = capsys.readouterr().err  # a list prompt is a conversation: its messages are checked
    assert f"{bad}:2: field 'prompt[0]': found string (expected a message object" in message
    assert main(["eval", f"prompts={good}"]) == 1
    assert "set base_model=..., model=..." in capsys.readouterr().err


def test_eval_help_lists_every_field(capsys):
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    for f in fields(EvalConfig):
        assert f"  {f.name} = " in text or f"  {f.name}.*\n" in text  # a field, or a section's heading
