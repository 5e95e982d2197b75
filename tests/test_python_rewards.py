"""`type: python` (reward functions written as TRL writes them) and `type: verl` (a verl compute_score): how they
are called, what each keyword holds, None as no opinion, async functions, the columns read from a signature,
errors naming the source and the row; and a real tiny GRPO run reading TRL-style functions from a .py file."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

import alignkit.algorithms.grpo as grpo
from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError, load_config
from alignkit.config.online import GRPOConfig
from alignkit.data.readers import DataError
from alignkit.rewards import RewardSet, build_reward
from alignkit.rewards.base import row_context
from alignkit.rewards.python import RewardFunctionError
from tests.conftest import REPO, train_metrics

TRL_STYLE = REPO / "examples" / "rewards" / "trl_style.py"
VERL_STYLE = REPO / "examples" / "rewards" / "verl_style.py"


def keyword_reward(completions, **kwargs):
    """A reward in an importable module (for "package.module:name")."""
    return [float(len(c)) for c in completions]


def python(name: str, **options) -> dict:
    return {"type": "python", "function": f"{TRL_STYLE}:{name}", **options}


def test_trl_docs_functions_score_text_and_conversational_rows_unchanged():
    """reward_len: -|20 - len|: 'abc' -> -17, 20 x's -> 0. format_reward_func reads completion[0]["content"]
    (a conversational row's completion is one assistant message); reward_func reads the ground_truth column."""
    rewards = RewardSet.from_specs([python("reward_len")])
    assert rewards.sources[0].name == "reward_len"  # named after the function, as TRL names it
    assert rewards.columns == ()  # **kwargs requires no column
    out = rewards(["p", "p"], ["abc", "x" * 20])
    assert out.total.tolist() == [-17.0, 0.0]

    chat = [{"role": "user", "content": "think"}]
    fmt = build_reward(python("format_reward_func"))
    scores = fmt.score(
        [chat, chat], ["<think>a</think><answer>b</answer>", "no tags"], context=row_context([{}], 2)
    )
    assert scores.tolist() == [1.0, 0.0]

    gt = RewardSet.from_specs([python("reward_func")])
    assert gt.columns == ("ground_truth",)  # a named parameter without a default: required
    context = row_context([{"ground_truth": "cat"}, {"ground_truth": "7"}], 2)
    out = gt(["a", "a", "b", "b"], ["a cat", "a dog", "7 days", "six"], context=context)
    assert out.total.tolist() == [1.0, 0.0, 1.0, 0.0]  # each prompt's value repeated for its 2 completions


def test_every_keyword_holds_what_trl_passes(tmp_path):
    """One call per batch, by keyword: prompts as given (messages for a chat row), completions (text, or
    [assistant message]), completion_ids, trainer_state.global_step, every column of the row (a **kwargs
    function gets them all) and the fixed kwargs."""
    seen = tmp_path / "seen.json"
    (tmp_path / "spy.py").write_text(
        textwrap.dedent(
            f"""
            import json
            def spy(prompts, completions, completion_ids, trainer_state, **kwargs):
                json.dump({{"prompts": prompts, "completions": completions, "ids": completion_ids,
                           "step": trainer_state.global_step, "kwargs": kwargs}}, open({str(seen)!r}, "w"))
                return [1.0] * len(completions)
            """
        )
    )
    source = build_reward(
        {"type": "python", "function": f"{tmp_path}/spy.py:spy", "kwargs": {"tolerance": 0.5}}
    )
    chat = [{"role": "user", "content": "hi"}]
    context = row_context(
        [{"answer": "4", "level": 1}, {"answer": "9"}], 2, completion_ids=[[1], [2, 3], [4], [5, 6]], step=7
    )
    source.score(["text", "text", chat, chat], ["a", "b", "c", "d"], context=context)
    got = json.loads(seen.read_text())
    assert got["prompts"] == ["text", "text", chat, chat]
    assert got["completions"] == [
        "a",
        "b",
        [{"role": "assistant", "content": "c"}],
        [{"role": "assistant", "content": "d"}],
    ]
    assert got["ids"] == [[1], [2, 3], [4], [5, 6]] and got["step"] == 7
    # A column one row lacks is None there (the commands require the named ones in every row beforehand).
    assert got["kwargs"] == {"answer": ["4", "4", "9", "9"], "level": [1, 1, None, None], "tolerance": 0.5}


def test_columns_from_the_signature_and_the_columns_option(tmp_path):
    """Named parameters without a default are required; with a default, passed where present; a function
    without **kwargs gets only what it names; `columns:` overrides the signature."""
    (tmp_path / "f.py").write_text(
        "def named(completions, answer, hint=None):\n"
        "    return [float(a == c) + (0.5 if h else 0.0) for c, a, h in zip(completions, answer, hint or [None] * len(completions))]\n"
        "def loose(completions, **kw):\n"
        "    return [10.0 * ('a' in kw) + ('b' in kw) for _ in completions]\n"
    )
    named = build_reward({"type": "python", "function": f"{tmp_path}/f.py:named"})
    assert named.columns == ("answer",)
    assert named.score(["p"], ["4"], context=row_context([{"answer": "4", "other": 1}])).tolist() == [1.0]
    assert named.score(["p"], ["4"], context=row_context([{"answer": "4", "hint": "x"}])).tolist() == [1.5]
    explicit = RewardSet.from_specs(
        [{"type": "python", "function": f"{tmp_path}/f.py:loose", "columns": ["a"]}]
    )
    assert explicit.columns == ("a",)
    # Only the listed column is passed (a: 10, not b: 1), and a row set without it is refused.
    assert explicit(["p"], ["x"], context=row_context([{"a": 1, "b": 2}])).total.tolist() == [10.0]
    with pytest.raises(ValueError, match="reads the column"):
        explicit(["p"], ["x"], context=row_context([{"b": 2}]))
    with pytest.raises(ConfigError, match="takes no parameter 'nope'"):
        build_reward({"type": "python", "function": f"{tmp_path}/f.py:named", "columns": ["nope"]})


def test_none_is_no_opinion_and_async_functions_are_awaited():
    """only_long abstains (None) under 12 characters; the weighted sum leaves it out: row 0 = 1·1 + 0.5·(-17),
    row 1 = 0.5·(-8) (only reward_len's term), as TRL's nan-sum. async_vowels: 'aaa' -> 1.0, 'xyz' -> 0.0."""
    rewards = RewardSet.from_specs([python("only_long"), python("reward_len", weight=0.5)])
    out = rewards(["p", "p"], ["a" * 37, "b" * 12 + "c" * 16])
    assert math.isnan(out.scores["only_long"][1]) is False and out.scores["only_long"].tolist() == [1.0, 1.0]
    out = rewards(["p", "p"], ["a" * 37, "short"])
    assert out.scores["only_long"][0] == 1.0 and math.isnan(out.scores["only_long"][1])
    assert out.total.tolist() == [1.0 + 0.5 * -17, 0.5 * -15]
    assert build_reward(python("async_vowels")).score(
        ["p", "p"], ["aaa", "xyz"], context=row_context([{}], 2)
    ).tolist() == [1.0, 0.0]


def test_a_missing_file_module_or_function_is_a_config_error_saying_which(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"file not found \(looked for .*nope\.py; a relative path is read from the working directory",
    ):
        build_reward({"type": "python", "function": "nope.py:f"})
    with pytest.raises(ConfigError, match="no module named 'no_such_module_xyz'"):
        build_reward({"type": "python", "function": "no_such_module_xyz:f"})
    with pytest.raises(ConfigError, match=r"has no attribute 'reward_lenn' \(its callables: .*reward_len"):
        build_reward(python("reward_lenn"))
    with pytest.raises(ConfigError, match="names no function"):
        build_reward({"type": "python", "function": str(TRL_STYLE)})
    # "package.module:name": an importable module's function.
    source = build_reward({"type": "python", "function": "tests.test_python_rewards:keyword_reward"})
    assert source.score(["p"], ["abcd"], context=row_context([{}])).tolist() == [4.0]


def test_bad_results_and_exceptions_name_the_source_and_the_row(tmp_path):
    (tmp_path / "bad.py").write_text(
        "def short(completions, **kw):\n    return [1.0]\n"
        "def text(completions, **kw):\n    return [1.0, 'high']\n"
        "def boom(completions, **kw):\n    raise KeyError('solution')\n"
    )
    context = row_context([{}, {}], 1, origins=["rows.jsonl:3", "rows.jsonl:4"])
    for name, message in [
        ("short", r"'short' returned 1 values for 2 completions"),
        ("text", r"'text' returned 'high' \(a str\) for completion 1 \(rows.jsonl:4, prompt 1\)"),
        (
            "boom",
            r"'boom' .* raised KeyError: 'solution'; scoring 2 completions: completion 0 \(rows.jsonl:3",
        ),
    ]:
        source = build_reward({"type": "python", "function": f"{tmp_path}/bad.py:{name}"})
        with pytest.raises(RewardFunctionError, match=message):
            source.score(["p", "q"], ["a", "b"], context=context)


def test_verl_compute_score_from_named_columns(tmp_path):
    """verl_style.compute_score: 1.0 where the response says the row's answer as a word, else 0.0 (a dict with
    "score"; its words key, 3, 3 and 2 words, is averaged into the source's metrics: 8/3). verl's docs' own
    my_reward_fn, len/100: 'abcd' -> 0.04."""
    source = build_reward(
        {"type": "verl", "function": str(VERL_STYLE), "ground_truth": "answer", "data_source": None}
    )
    assert source.name == "verl" and source.columns == ("answer",)
    context = row_context([{"answer": "three"}, {"answer": "five"}, {"answer": "five"}])
    scores = source.score(["a", "b", "c"], ["one, two, Three!", "four and six", "no idea"], context=context)
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert float(source.metrics()["words"]) == pytest.approx(8 / 3)
    docs = build_reward(
        {
            "type": "verl",
            "function": f"{VERL_STYLE}:my_reward_fn",
            "data_source": None,
            "ground_truth": "answer",
        }
    )
    assert docs.score(["a"], ["abcd"], context=row_context([{"answer": "x"}])).tolist() == [
        pytest.approx(0.04)
    ]
    # verl's own row layout: data_source, reward_model.ground_truth, extra_info, passed as verl passes them.
    (tmp_path / "spy_verl.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    compute_score.calls.append((data_source, solution_str, ground_truth, extra_info))\n"
        "    return 1.0 if solution_str.endswith(ground_truth) else 0.0\n"
        "compute_score.calls = []\n"
    )
    default = build_reward({"type": "verl", "function": f"{tmp_path}/spy_verl.py"})
    assert default.columns == ("data_source", "reward_model")
    rows = [
        {"data_source": "gsm8k", "reward_model": {"ground_truth": "4"}, "extra_info": {"split": "train"}},
        {"data_source": "math", "reward_model": {"ground_truth": "7"}},
    ]
    assert default.score(["q", "r"], ["2+2=4", "x"], context=row_context(rows)).tolist() == [1.0, 0.0]
    assert default.fn.calls == [
        ("gsm8k", "2+2=4", "4", {"split": "train"}),
        ("math", "x", "7", {}),  # a row without extra_info gets {}, as verl
    ]
    with pytest.raises(RewardFunctionError, match="'reward_model.ground_truth' has no key 'ground_truth'"):
        default.score(["q"], ["4"], context=row_context([{"data_source": "x", "reward_model": {}}]))


def test_a_tiny_grpo_run_trains_on_trl_style_functions_from_a_file(tmp_path, tiny_model_dir):
    """Three functions from TRL's docs read from a .py file (reward_len, a `solution` column with the step, an
    async one) plus one that abstains, in a real grpo run: every step logs each source, and a row that lacks
    the `solution` column fails before any model loads, as file:line."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Tom went out {i}. It was", "solution": "ea"}) + "\n" for i in range(8)
        )
    )
    cfg = GRPOConfig(
        model=str(tiny_model_dir),
        data=str(data),
        output_dir=str(tmp_path / "out"),
        rewards=[
            python("reward_len", weight=0.05),
            python("solution_reward"),
            python("async_vowels"),
            python("only_long"),
        ],
        batch_size=2,
        num_generations=4,
        generation=GenerationSettings(max_new_tokens=8),
        max_steps=3,
        lr=1e-2,
        beta=0.0,
        save_steps=0,
        eval_steps=1000,
        progress=False,
        report=False,
        seed=1,
    )
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    assert len(metrics) == 3
    for m in metrics:
        for name in ("reward_len", "solution_reward", "async_vowels", "only_long"):
            assert f"rewards/{name}/mean" in m or m.get(f"rewards/{name}/none") == 1.0
        assert math.isfinite(m["reward"]) and math.isfinite(m["advantages/mean"])

    data.write_text(data.read_text() + json.dumps({"prompt": "No solution here"}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:9: field 'solution': missing"):
        grpo.train(GRPOConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "out2")}))


def test_a_conversational_grpo_run_gives_trl_style_messages(tmp_path, tiny_model_dir):
    """Chat rows: format_reward_func reads completion[0]["content"] (a string completion would raise inside it,
    failing the run) and reward_func reads the ground_truth column; both log a score every step."""
    import shutil

    from alignkit.models.load import load_tokenizer

    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    tokenizer = load_tokenizer(str(policy))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    tokenizer.save_pretrained(policy)
    data = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": f"Tell story {i}."}], "ground_truth": "e"} for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = GRPOConfig(
        model=str(policy),
        data=str(data),
        output_dir=str(tmp_path / "out"),
        rewards=[python("format_reward_func"), python("reward_func")],
        batch_size=2,
        num_generations=2,
        generation=GenerationSettings(max_new_tokens=6),
        max_steps=2,
        beta=0.0,
        save_steps=0,
        eval_steps=1000,
        progress=False,
        report=False,
        seed=1,
    )
    grpo.train(cfg)
    for m in train_metrics(cfg):
        assert m["rewards/format_reward_func/mean"] == 0.0  # a random policy writes no <think> tags
        assert 0.0 <= m["rewards/reward_func/mean"] <= 1.0


def test_the_python_rewards_example_runs(tmp_path, monkeypatch):
    """examples/python_rewards.yaml, as docs/rewards.md runs it (from the repository root), for 2 steps."""
    monkeypatch.chdir(REPO)
    cfg = load_config(
        GRPOConfig,
        str(REPO / "examples" / "python_rewards.yaml"),
        [
            f"output_dir={tmp_path / 'run'}",
            "max_steps=2",
            "progress=false",
            "report=false",
            "eval_steps=1000",
        ],
    )
    grpo.train(cfg)
    last = train_metrics(cfg)[-1]
    assert {"rewards/reward_len/mean", "rewards/correct/mean"} <= set(last)


def test_unscored_rows_reach_the_advantages_as_nan():
    """Not a unit of this module, but the contract it relies on: a completion every source left at None has a
    NaN total (weighted_sum), which the estimators turn into advantage 0 (tests/test_unscored_advantages.py)."""
    rewards = RewardSet.from_specs([python("only_long")])
    assert torch.isnan(rewards(["p"], ["short"]).total).all()


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_runs_train_through_completions_no_source_scored(tmp_path, tiny_model_dir, command):
    """A reward that abstains on every other completion (the only source): half the step is unscored, logged as
    frac_unscored 0.5, and every logged figure stays finite (the advantages give those completions 0; PPO gives
    them the scored mean)."""
    import alignkit.algorithms.ppo as ppo
    from alignkit.config.online import PPOConfig

    (tmp_path / "half.py").write_text(
        "def every_other(completions, **kwargs):\n"
        "    return [None if i % 2 else float(len(c)) for i, c in enumerate(completions)]\n"
    )
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom went out {i}. It was"}) + "\n" for i in range(8)))
    common = dict(
        model=str(tiny_model_dir),
        data=str(data),
        output_dir=str(tmp_path / "out"),
        rewards=[{"type": "python", "function": f"{tmp_path}/half.py:every_other"}],
        batch_size=4,
        generation=GenerationSettings(max_new_tokens=4),
        max_steps=2,
        lr=1e-3,
        save_steps=0,
        eval_steps=1000,
        progress=False,
        report=False,
        seed=1,
    )
    if command == "grpo":
        cfg = GRPOConfig(**common, num_generations=4, beta=0.0)
        grpo.train(cfg)
    else:
        cfg = PPOConfig(**common, kl_coef=0.05)
        ppo.train(cfg)
    for m in train_metrics(cfg):
        assert m["frac_unscored"] == 0.5 and m["rewards/every_other/none"] == 0.5
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
