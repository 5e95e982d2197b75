"""Sampling (alignkit.generation.sampling) and before/after evaluation (alignkit.evaluation.compare) on the shipped model."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import torch

import alignkit
from alignkit.evaluation.compare import compare_policies, completion_nll, format_markdown, perplexity
from alignkit.evaluation.stats import mean_and_stderr
from alignkit.generation.sampling import sample
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSet
from alignkit.rewards.rules import vader_compound

MODEL = Path(alignkit.__file__).parent / "assets" / "tinystories-656k"
EOS = 2
# Different lengths, so that batches are left-padded.
PROMPTS = [
    "Once upon a time, there was a little dog named Max. One day, he ",
    "Lily ",
    "Once upon a time, in a big forest, there lived a small rabbit named Ben. Every day, he went to the "
    "river. One morning, he ",
]
# The model ends a story soon after this (it spells out "<|end_story|>" and then emits EOS).
ENDING = "Tom and Sue played all day. They were very happy. The end."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(MODEL))


@pytest.fixture(scope="module")
def model(tokenizer):
    return load_causal_lm(str(MODEL), pad_token_id=tokenizer.pad_token_id)


def ids(samples):
    return [s.completion_ids for s in samples]


def test_sampling_is_reproducible_and_changes_with_the_seed(model, tokenizer):
    a = sample(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=16, seed=0)
    torch.manual_seed(123)  # the global RNG plays no part
    b = sample(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=16, seed=0)
    c = sample(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=16, seed=1)
    assert ids(a) == ids(b)
    # 16 tokens from a 2048-word softmax: a repeat across seeds would be a seeding bug.
    assert all(x != y for x, y in zip(ids(a), ids(c)))
    # The two samples of one prompt use different noise.
    assert all(ids(a)[2 * i] != ids(a)[2 * i + 1] for i in range(len(PROMPTS)))
    assert [s.prompt for s in a] == [p for p in PROMPTS for _ in range(2)]
    assert all(s.prompt_ids == tokenizer(s.prompt)["input_ids"] and s.prompt_ids[0] == 1 for s in a)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_left_padded_batches_sample_what_one_at_a_time_samples(model, tokenizer, temperature):
    batched = sample(
        model, tokenizer, PROMPTS, 2, max_new_tokens=24, temperature=temperature, seed=7, batch_size=6
    )
    single = sample(
        model, tokenizer, PROMPTS, 2, max_new_tokens=24, temperature=temperature, seed=7, batch_size=1
    )
    odd = sample(
        model, tokenizer, PROMPTS, 2, max_new_tokens=24, temperature=temperature, seed=7, batch_size=4
    )
    assert ids(batched) == ids(single) == ids(odd)


def test_checkpoint_generation_settings_do_not_reshape_the_distribution(model, tokenizer):
    expected = sample(model, tokenizer, PROMPTS, 2, max_new_tokens=16, seed=8)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=16)
    try:
        assert ids(sample(model, tokenizer, PROMPTS, 2, max_new_tokens=16, seed=8)) == ids(expected)
    finally:
        model.generation_config = saved


def test_completion_is_cut_after_the_first_eos(model, tokenizer):
    samples = sample(model, tokenizer, [ENDING], num_samples=16, max_new_tokens=24, seed=0)
    ended = [s for s in samples if EOS in s.completion_ids]
    assert 0 < len(ended) < len(samples)  # both kinds are present in this batch
    for s in samples:
        c = s.completion_ids
        if EOS in c:
            assert c.index(EOS) == len(c) - 1 and len(c) < 24  # kept, last, and nothing after it
        else:
            assert len(c) == 24  # not padded, not cut
        assert s.text == tokenizer.decode(c, skip_special_tokens=True)


def test_sampling_draws_from_the_model_distribution(model, tokenizer):
    """First-token frequencies over 2000 samples vs the softmax, each within 4 standard errors."""
    prompt = PROMPTS[0]
    n = 2000
    samples = sample(model, tokenizer, [prompt], num_samples=n, max_new_tokens=1, seed=3, batch_size=n)
    counts = torch.bincount(torch.tensor([s.completion_ids[0] for s in samples]), minlength=2048)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
    p = logits.float().softmax(-1)
    for token in p.topk(5).indices.tolist():
        se = math.sqrt(p[token] * (1 - p[token]) / n)
        assert abs(counts[token] / n - p[token]) < 4 * se + 1e-3

    top3 = set(p.topk(3).indices.tolist())
    truncated = sample(model, tokenizer, [prompt], num_samples=64, max_new_tokens=1, top_k=3, seed=3)
    assert {s.completion_ids[0] for s in truncated} <= top3
    assert ids(sample(model, tokenizer, [prompt], 4, max_new_tokens=8, top_k=1, seed=5)) == ids(
        sample(model, tokenizer, [prompt], 4, max_new_tokens=8, temperature=0.0)
    )


def test_mean_and_stderr_by_hand():
    """[1, 2, 3, 4]: mean 2.5, sample variance 5/3, standard error sqrt(5/3 / 4) = 0.645497."""
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(0.6454972, abs=1e-6)
    assert mean_and_stderr([0.3]) == (0.3, 0.0)


def test_vader_orders_positive_above_negative():
    positive = ["Lily was so happy. She loved her new toy and smiled.", "They had a wonderful, fun day."]
    negative = ["Tom was sad and angry. He hated the broken toy.", "The dog was scared and hurt."]
    pos, neg = vader_compound(positive), vader_compound(negative)
    assert min(pos) > 0.5 and max(neg) < -0.5
    assert vader_compound(["The box is on the table."]) == [0.0]


def test_completion_nll_matches_an_unbatched_forward(model, tokenizer):
    """Right-padded batched NLL equals -sum log_softmax gathered on each unpadded row."""
    samples = sample(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=12, seed=2)
    sums, counts = completion_nll(model, [s.prompt_ids for s in samples], ids(samples), batch_size=4)
    for s, got, count in zip(samples, sums, counts):
        row = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logps = model(row).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
        target = row[0, 1:]
        token_logps = logps.gather(-1, target[:, None])[:, 0][len(s.prompt_ids) - 1 :]
        assert count == len(s.completion_ids)
        assert got == pytest.approx(-token_logps.sum().item(), rel=1e-4)


def test_perplexity_is_lower_on_own_greedy_text_than_on_it_shuffled(model, tokenizer):
    greedy = sample(model, tokenizer, PROMPTS, max_new_tokens=32, temperature=0.0)
    shuffled = [random.Random(0).sample(c, len(c)) for c in ids(greedy)]
    prompt_ids = [s.prompt_ids for s in greedy]
    own, mixed = perplexity(model, prompt_ids, ids(greedy)), perplexity(model, prompt_ids, shuffled)
    assert own < 10 and mixed > 10 * own


def test_compare_policies_of_a_model_with_itself_is_a_zero_difference(model, tokenizer):
    vader = RewardSet.from_specs([{"type": "vader"}])
    report = compare_policies(
        model, model, tokenizer, PROMPTS, rewards=vader, num_samples=2, seed=4, num_examples=2
    )
    sentiment = report["rewards"]["vader"]
    assert sentiment["difference"] == 0.0 and sentiment["difference_stderr"] == 0.0
    assert sentiment["base"] == sentiment["aligned"] and sentiment["win_rate"] == 0.5
    assert report["base"] == report["aligned"] and report["kl"]["mean"] == 0.0
    assert 1 < report["base"]["base_model_perplexity"] < 100
    assert [e["base"] for e in report["examples"]] == [e["aligned"] for e in report["examples"]]

    text = format_markdown(report)
    assert f"| vader | {sentiment['base']['mean']:+.3f} |" in text and "| +0.000 | 0.000 |" in text
    assert PROMPTS[0].strip() in text and len(report["examples"]) == 2
