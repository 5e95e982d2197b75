"""Verifiable rewards: final-answer extraction, math_answer (math-verify in a worker process), exact_match,
regex_match, format; called directly with a ScoreContext, and through a RewardSet."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import threading

import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.config.load import ConfigError
from alignkit.rewards import RewardSet, ScoreContext, build_reward
from alignkit.rewards.answers import final_answer, last_boxed, reference_answer
from alignkit.rewards.verifiable import MathChecker
from tests.conftest import REPO

needs_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="pip install 'alignkit[math]'"
)


def scores(source, responses, column, name="answer"):
    return source.score([""] * len(responses), responses, context=ScoreContext({name: column})).tolist()


# ---------------------------------------------------------------------------------------------
# finding the answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"so the area is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} is it", r"\frac{\sqrt{3}}{2}"),  # nested braces
        (r"first \boxed{1}, then \boxed{2}", "2"),  # the last one
        (r"\fbox{7}", "7"),
        (r"\boxed{4", "4"),  # an unclosed box (cut at the token limit) is no box: the last number
        ("6 * 7 = 42, so the answer is 42.", "42"),
        ("The answer is $\\frac{1}{2}$.", r"\frac{1}{2}"),
        ("Final answer: -3.5", "-3.5"),
        ("The answer is **12**", "12"),
        ("The answer is 3.5. Let me check: 7", "3.5"),  # a sentence ends at '. ' before a word
        ("The answer is 0.5, as shown", "0.5"),
        ("The answer is (1, 2).", "(1, 2)"),
        ("<answer>The answer is 0.5</answer>", "0.5"),
        ("I count 3 cats and 4 dogs: 7 in all", "7"),  # the last number
        ("5-3=2", "2"),
        ("so x = -4", "-4"),  # a minus not glued to a digit before it
        ("it costs 1,000 dollars", "1,000"),
        ("half is 1/2", "1/2"),
        ("no digits here", None),
    ],
)
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_reference_answer_reads_numbers_gsm8k_and_math_solutions():
    assert [reference_answer(v) for v in (42, 0.5, "#### 18", "so \\boxed{3}.", " $\\frac12$ ")] == [
        "42",
        "0.5",
        "18",
        "3",
        "\\frac12",
    ]
    assert [reference_answer(v) for v in ("", None, True, ["1"])] == [None] * 4
    assert last_boxed(r"\boxed{a{b}c}") == "a{b}c"


# ---------------------------------------------------------------------------------------------
# math_answer


@pytest.fixture(scope="module")
def math_reward():
    if importlib.util.find_spec("math_verify") is None:
        pytest.skip("pip install 'alignkit[math]'")
    return build_reward({"type": "math_answer", "timeout": 1.0})


@needs_math_verify
def test_math_answer_scores_equivalent_answers_one_and_wrong_ones_zero(math_reward):
    """Each response against its reference: boxed with nested braces, "answer is", the last number,
    1/2 = 0.5 = \\frac{1}{2}, LaTeX x^2+1 = 1+x^2, a negative number, and three wrong answers (-2 is not 2,
    1.414 is not sqrt 2, no answer at all)."""
    responses = [
        r"\boxed{\frac{1}{2}}",
        "so the answer is 0.5",
        "3 + 4 = 7",
        r"we get \boxed{1 + x^{2}}",
        "the answer is -2",
        "The answer is $\\dfrac{1}{2}$.",
        "the answer is -2",
        "about 1.414",
        "I do not know",
    ]
    references = ["1/2", r"\frac12", 7, "x^2+1", "-2", 0.5, "2", r"\sqrt{2}", "5"]
    before = math_reward.metrics()
    assert scores(math_reward, responses, references) == [1.0] * 6 + [0.0] * 3
    after = math_reward.metrics()
    assert after["correct"] - before.get("correct", 0) == 6
    assert after["no_answer"] - before.get("no_answer", 0) == 1


@needs_math_verify
def test_math_answer_gives_no_opinion_on_a_missing_or_unreadable_reference(math_reward):
    """A reference math-verify reads nothing in ('') or that is missing is NaN and counted, never 0."""
    before = math_reward.metrics().get("bad_reference", 0)
    out = scores(math_reward, ["the answer is 3", "the answer is 3", "3"], [None, "$$", "3"])
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2] == 1.0
    assert math_reward.metrics()["bad_reference"] - before == 2
    # through a RewardSet the NaN is no opinion: a row no source scored is NaN, the others count
    rewards = RewardSet([math_reward])
    total = rewards(["", ""], ["3", "3"], context=ScoreContext({"answer": [None, "3"]})).total
    assert math.isnan(total[0]) and total[1] == 1.0


@needs_math_verify
def test_math_answer_works_from_a_thread_and_times_out_per_item(math_reward):
    """math-verify's own SIGALRM timeout fails off the main thread; ours lives in the worker: scored from a
    thread, 9^(9^(9^9)) (which sympy would compute for hours) times out after 1 s and scores 0, counted, and
    the next item is checked by the same worker."""
    before = math_reward.metrics()
    out = {}

    def run():
        out["s"] = scores(math_reward, [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2}"], ["1", "2"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert out["s"] == [0.0, 1.0]
    after = math_reward.metrics()
    assert after["timeouts"] - before.get("timeouts", 0) == 1
    assert after["worker_restarts"] == before["worker_restarts"]


def test_a_hung_worker_is_killed_and_replaced():
    """A worker that never answers (a computation inside C, which no alarm stops) costs its item: after
    timeout + grace it is killed, the item is a timeout, and the next item starts a new worker."""
    hang = "import sys; print('{\"ready\": true}', flush=True); sys.stdin.readline(); import time; time.sleep(60)"
    checker = MathChecker(0.2, grace=0.2, command=[sys.executable, "-c", hang])
    assert checker.check([("1", "1")]) == ["timeout"]
    assert checker.restarts == 1 and checker.proc is None
    assert checker.check([("1", "1")]) == ["timeout"] and checker.restarts == 2


def test_math_answer_needs_its_column_and_a_valid_timeout():
    rewards = RewardSet.from_specs([{"type": "format"}, {"type": "math_answer", "answer_column": "solution"}])
    assert rewards.columns == ("solution",)
    with pytest.raises(ValueError, match="reads the column.*solution.*columns there: answer"):
        rewards(["p"], ["4"], context=ScoreContext({"answer": ["4"]}))
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        build_reward({"type": "math_answer", "timeout": 0})


def test_math_answer_without_math_verify_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "math_verify" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'alignkit\[math\]'"):
        build_reward({"type": "math_answer"})


# ---------------------------------------------------------------------------------------------
# exact_match, regex_match


def test_exact_match_compares_the_chosen_part():
    """whole (stripped), final_answer, a regex group; case folding; a list of accepted answers; NaN
    without a reference; 0 when nothing is extracted."""
    whole = build_reward({"type": "exact_match"})
    assert scores(whole, [" Paris\n", "paris", "Paris!"], ["Paris", "Paris", "Paris"]) == [1.0, 0.0, 0.0]
    folded = build_reward({"type": "exact_match", "ignore_case": True, "strip": False})
    assert scores(folded, ["PARIS", " paris"], ["Paris", "Paris"]) == [1.0, 0.0]
    final = build_reward({"type": "exact_match", "extract": "final_answer", "answer_column": "label"})
    out = scores(
        final, ["so the answer is B.", r"\boxed{42}", "no answer", "x"], ["B", 42, "A", None], "label"
    )
    assert out[:3] == [1.0, 1.0, 0.0] and math.isnan(out[3])
    assert final.metrics() == {"matched": 2.0, "no_answer": 1.0, "no_reference": 1.0, "scored": 4.0}
    tagged = build_reward({"type": "exact_match", "extract": "regex", "pattern": r"<answer>(.*?)</answer>"})
    out = scores(
        tagged, ["<answer>x</answer> <answer> 7 </answer>", "7", "<answer>8</answer>"], [["7", "seven"]] * 3
    )
    assert out == [1.0, 0.0, 0.0]


def test_exact_match_options_are_checked():
    with pytest.raises(ConfigError, match="extract 'box' is not one of"):
        build_reward({"type": "exact_match", "extract": "box"})
    with pytest.raises(ConfigError, match="extract: regex needs one"):
        build_reward({"type": "exact_match", "extract": "regex"})
    with pytest.raises(ConfigError, match="'pattern' is for extract: regex"):
        build_reward({"type": "exact_match", "pattern": "(.*)"})


def test_regex_match_with_the_rows_expression_or_a_pattern_filled_from_the_row():
    """The row's value as the expression (search / fullmatch), or put into `pattern` escaped: '3.5' must
    match '3.5' literally, not '3x5'. A row expression that does not compile is NaN and counted."""
    own = build_reward({"type": "regex_match", "answer_column": "regex", "flags": "i"})
    out = scores(own, ["It is PARIS.", "Lyon", "x"], [r"\bparis\b", r"\bparis\b", "(unclosed"], "regex")
    assert out[:2] == [1.0, 0.0] and math.isnan(out[2])
    assert own.metrics()["bad_pattern"] == 1.0
    full = build_reward({"type": "regex_match", "answer_column": "regex", "match": "fullmatch"})
    assert scores(full, ["42", "42 apples"], [r"\d+", r"\d+"], "regex") == [1.0, 0.0]
    filled = build_reward({"type": "regex_match", "pattern": r"<answer>\s*{value}\s*</answer>"})
    out = scores(filled, ["<answer> 3.5 </answer>", "<answer>3x5</answer>", "3.5"], ["3.5", "3.5", "3.5"])
    assert out == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match=r"has no \{value\}"):
        build_reward({"type": "regex_match", "pattern": "<answer>"})
    with pytest.raises(ConfigError, match="match 'any' is not one of"):
        build_reward({"type": "regex_match", "match": "any"})


# ---------------------------------------------------------------------------------------------
# format


def test_format_think_answer_matches_the_whole_layout_once():
    fmt = build_reward({"type": "format"})
    good = ["<think>\n2 + 2\n</think>\n<answer>4</answer>", "  <think>a\nb</think><answer>\n4\n</answer>\n"]
    bad = [
        "<answer>4</answer>",  # no reasoning
        "<think>x</think><answer>4</answer> and more",  # text after the layout
        "<think>x</think><answer>4</answer><answer>5</answer>",  # a second answer
        "<think>x<think>y</think></think><answer>4</answer>",  # nested tags
        "<think>x</think>4",
    ]
    assert fmt.score([""] * 7, good + bad).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert fmt.metrics() == {"matched": 2.0, "scored": 7.0}


def test_format_presets_partial_credit_and_own_layout():
    """partial: half the share of the four tags present exactly once: <think> and </think> only -> 2/4/2 =
    0.25; all four but with text after -> 4/4/2 = 0.5; the layout itself 1.0."""
    partial = build_reward({"type": "format", "partial": True})
    out = partial.score(
        [""] * 3,
        ["<think>x</think> 4", "<think>x</think><answer>4</answer> hi", "<think>x</think><answer>4</answer>"],
    )
    assert out.tolist() == [0.25, 0.5, 1.0]
    think = build_reward({"type": "format", "layout": "think"})
    assert think.score([""] * 3, ["<think>x</think> 4", "<think>x</think>  ", "4"]).tolist() == [
        1.0,
        0.0,
        0.0,
    ]
    own = build_reward({"type": "format", "layout": r"Answer: \d+"})
    assert own.score([""] * 2, ["Answer: 12", "Answer: 12."]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="partial credit counts a preset's tags"):
        build_reward({"type": "format", "layout": r"\d+", "partial": True})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        build_reward({"type": "format", "layout": "(unclosed"})


def test_verifiable_rewards_compose_in_a_reward_set():
    """format (0.5 weight) + exact_match on the answer tag: 0.5 * 1 + 1 * 1 = 1.5, 0.5 * 1 + 0 = 0.5,
    and a row without a reference gets the format term alone (0.5 * 0 = 0.0; NaN is left out)."""
    rewards = RewardSet.from_specs(
        [
            {"type": "format", "weight": 0.5},
            {"type": "exact_match", "extract": "regex", "pattern": "<answer>(.*?)</answer>"},
        ]
    )
    responses = ["<think>t</think><answer>4</answer>", "<think>t</think><answer>5</answer>", "4"]
    out = rewards([""] * 3, responses, context=ScoreContext({"answer": ["4", "4", None]}))
    assert torch.equal(out.total, torch.tensor([1.5, 0.5, 0.0]))


# ---------------------------------------------------------------------------------------------
# end to end: the shipped example through `alignkit score`, and a grpo run


EXAMPLE = REPO / "examples" / "verifiable"


def test_the_shipped_example_scores_through_alignkit_score(tmp_path, capsys):
    """examples/verifiable/math.yaml on its six rows: math_answer 1, 1, 0 (3 is not -3), 1 (42 against a
    GSM8K '#### 42'), 1 (2x), 0 (no answer); format 1, 1, 1, 0, 1, 0; reward = math + 0.2 format."""
    data, output = f"data={EXAMPLE / 'math_responses.jsonl'}", f"output={tmp_path / 'math.jsonl'}"
    assert main(["score", data, "rewards=[{type: format}]", f"output={tmp_path / 'format.jsonl'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "format.jsonl").read_text().splitlines()]
    assert [r["score_format"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    if importlib.util.find_spec("math_verify") is None:
        pytest.skip("pip install 'alignkit[math]'")
    # the example's sources with the rows' `answer` column, as a training run passes it
    specs = yaml.safe_load((EXAMPLE / "math.yaml").read_text())["rewards"]
    rows = [json.loads(line) for line in (EXAMPLE / "math_responses.jsonl").read_text().splitlines()]
    context = ScoreContext({"answer": [r["answer"] for r in rows]})
    out = RewardSet.from_specs(specs)(
        [r["prompt"] for r in rows], [r["response"] for r in rows], context=context
    )
    assert out.scores["math_answer"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert out.total.tolist() == pytest.approx([1.2, 1.2, 0.2, 1.0, 1.2, 0.0])
    capsys.readouterr()
    code = main(["score", str(EXAMPLE / "math.yaml"), data, output])
    if code != 0 and "passes no row columns" in capsys.readouterr().err:
        pytest.skip("alignkit score does not pass the rows' columns to reward sources yet (branch pyreward)")
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "math.jsonl").read_text().splitlines()]
    assert [r["score_math_answer"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert [r["reward"] for r in rows] == pytest.approx([1.2, 1.2, 0.2, 1.0, 1.2, 0.0])


def test_grpo_scores_completions_against_their_prompt_rows_columns(tmp_path, tiny_model_dir):
    """4 prompt rows, each with a `pattern`: '.*' (matches any completion) on three, '(?!)' (matches none)
    on one, and an empty `answer` (math_answer: no opinion, left out of the sum). Every step samples all 4
    prompts x 4 completions, so its mean reward is exactly 3/4 and every group has zero reward variance,
    whatever the random policy writes."""
    import dataclasses

    import alignkit.algorithms.grpo as grpo
    from alignkit.config.generation import GenerationSettings
    from alignkit.config.online import GRPOConfig
    from alignkit.data.prompts import PromptRow
    from tests.conftest import train_metrics

    if "columns" not in {f.name for f in dataclasses.fields(PromptRow)}:
        pytest.skip("prompt rows carry no columns yet (PromptRow.columns comes with branch pyreward)")
    if importlib.util.find_spec("math_verify") is None:
        pytest.skip("pip install 'alignkit[math]'")
    data = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": f"Tom went out {i}. It was", "pattern": ".*" if i < 3 else "(?!)", "answer": ""}
        for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = GRPOConfig(
        model=str(tiny_model_dir),
        data=str(data),
        output_dir=str(tmp_path / "out"),
        rewards=[{"type": "regex_match", "answer_column": "pattern"}, {"type": "math_answer"}],
        batch_size=4,
        num_generations=4,
        generation=GenerationSettings(max_new_tokens=4),
        beta=0.0,
        max_steps=2,
        save_steps=0,
        eval_steps=1000,
        progress=False,
    )
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    assert [m["reward"] for m in metrics] == [0.75, 0.75]
    assert [m["frac_reward_zero_std"] for m in metrics] == [1.0, 1.0]
