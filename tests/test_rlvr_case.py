"""The short version of docs/online_rl.md's case study, *RL with verifiable rewards on a CPU*:
scripts/build_arithmetic.py builds the data and an SFT model (one-digit problems here, two-digit there),
`alignkit grpo` trains it with `math_answer` against each row's `answer` column, and `alignkit eval`
measures exact accuracy before and after.

At this size GRPO learns the problems it trains on (+0.20 exact accuracy, 4 paired s.e., measured) but
not the 40 held-out ones (measured -0.05, s.e. 0.03), so the test asserts the first; the held-out gain is
the documented two-digit run's (docs/online_rl.md)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import REPO

from alignkit.cli import main


def load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_arithmetic", REPO / "scripts" / "build_arithmetic.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_problems_split_without_overlap(tmp_path):
    builder = load_builder()
    assert len(builder.problems(digits=1)) == 200 and len(builder.problems()) == 16200
    assert ("7-9=", "-2") in builder.problems(digits=1)
    builder.write_rows(tmp_path, sft=120, grpo=40, heldout=40, digits=1)
    sft = {r["prompt"] for r in read_jsonl(tmp_path / "sft_rows.jsonl")}
    grpo = read_jsonl(tmp_path / "grpo_prompts.jsonl")
    heldout = read_jsonl(tmp_path / "heldout.jsonl")
    assert len(sft) == 120 and len(grpo) == 40 and len(heldout) == 40
    prompts = [r["prompt"] for r in grpo + heldout]
    assert len(set(prompts) | sft) == 200  # no problem in two splits
    a, op, b = grpo[0]["prompt"][0], grpo[0]["prompt"][1], grpo[0]["prompt"][2]
    assert grpo[0]["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """The one-digit data and SFT model (about 10 s): (folder, model)."""
    root = tmp_path_factory.mktemp("arith")
    sft_args = ["epochs=60", "batch_size=16", "report=false", "progress=false"]
    model = load_builder().build(
        root, sft=120, grpo=40, heldout=40, hidden=64, layers=2, digits=1, sft_args=sft_args
    )
    return root, model


def run_case(arith, out, *generation):
    """grpo with math_answer on the GRPO prompts, then eval on the same prompts; asserts what both measure
    and returns the run's metrics."""
    root, model = arith
    common = ["generation.max_new_tokens=4", "rewards=[{type: math_answer}]", *generation]
    run = out / "grpo"
    prompts = root / "grpo_prompts.jsonl"
    args = ["grpo", f"model={model}", f"data={prompts}", f"output_dir={run}", "max_steps=60", "batch_size=8"]
    assert main(args + ["num_generations=8", "lr=3e-4", "report=false", "progress=false", *common]) == 0
    metrics = [m for m in read_jsonl(run / "metrics.jsonl") if "reward" in m]
    rewards = [m["reward"] for m in metrics]
    assert len(rewards) == 60
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last)  # measured 0.27 -> 0.48

    args = [
        "eval",
        f"base_model={model}",
        f"model={run / 'final'}",
        f"prompts={prompts}",
        f"output_dir={out / 'eval'}",
    ]
    assert main(args + ["num_samples=8", "num_examples=40", *common]) == 0
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    accuracy = report["rewards"]["math_answer"]
    # measured +0.203 (paired s.e. 0.047), 0.325 -> 0.528
    assert accuracy["difference"] > max(0.1, 2 * accuracy["difference_stderr"]), accuracy
    assert report["kl"]["mean"] > 0
    # every shown sample is scored against its own row's answer, for both models: the exact answer scores
    # 1, a text without that number anywhere scores 0
    answers = {r["prompt"]: r["answer"] for r in read_jsonl(prompts)}
    examples = report["examples"]
    assert len(examples) == 40
    for example in examples:
        answer = answers[example["prompt"]]
        for side in ("base", "aligned"):
            score = example[f"{side}_scores"]["math_answer"]
            if example[side].strip() == answer:
                assert score == 1.0, example
            elif int(answer) not in [int(n) for n in re.findall(r"-?\d+", example[side])]:
                assert score == 0.0, example
    assert any(e["aligned_scores"]["math_answer"] == 1.0 for e in examples)
    assert any(e["base_scores"]["math_answer"] == 0.0 for e in examples)
    return metrics


def test_grpo_with_math_answer_raises_exact_accuracy(tmp_path, arith):
    run_case(arith, tmp_path)
