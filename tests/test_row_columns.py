"""Row columns reach every scorer: prompt rows keep their other keys, the columns the rewards read are checked
in every train and eval row before any model loads (file:line; on_bad_rows=skip drops and lists them), and
every command that scores hands them to its reward sources: grpo, rloo, ppo, online-dpo, iterative-dpo,
generate, score and eval. The spy is a Python reward reading the `answer` column; each prompt's answer is the
number in its text, so a column that reached the wrong completion shows."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

import alignkit.algorithms.grpo as grpo
import alignkit.algorithms.iterative as iterative
import alignkit.algorithms.online_dpo as online_dpo
import alignkit.algorithms.ppo as ppo
from alignkit.config.generation import GenerationSettings
from alignkit.config.online import GRPOConfig, OnlineDPOConfig, PPOConfig
from alignkit.config.preference import IterativeDPOConfig
from alignkit.config.tools import EvalConfig, GenerateConfig, ScoreConfig
from alignkit.data.prompts import load_prompt_rows, load_prompts
from alignkit.data.readers import DataError
from alignkit.evaluation import command as eval_command
from alignkit.inference import best_of_n
from alignkit.rewards import score as score_command
from tests.conftest import TINYSTORIES

SPY = """
import json
def spy(prompts, completions, completion_ids, trainer_state, answer, **kwargs):
    with open({path!r}, "a") as f:
        f.write(json.dumps({{"prompts": prompts, "answer": answer, "step": trainer_state.global_step,
                            "max_steps": trainer_state.max_steps,
                            "ids": None if completion_ids is None else [len(i) for i in completion_ids],
                            "n": len(completions)}}) + "\\n")
    return [float(len(c)) for c in completions]
"""


def write_rows(path, n: int = 8, *, drop: int | None = None) -> str:
    """n prompt rows, row i "Tom went out {i}. It was" with answer "{i}" (row `drop`, 0-based, without it)."""
    rows = [{"prompt": f"Tom went out {i}. It was", "answer": str(i)} for i in range(n)]
    if drop is not None:
        del rows[drop]["answer"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def spy(tmp_path):
    """(the rewards list with the spy, a function returning every call it recorded)."""
    record = tmp_path / "calls.jsonl"
    (tmp_path / "spy.py").write_text(textwrap.dedent(SPY.format(path=str(record))))
    rewards = [{"type": "python", "function": f"{tmp_path}/spy.py:spy"}]

    def calls() -> list[dict]:
        return [json.loads(line) for line in record.read_text().splitlines()]

    return rewards, calls


def check_calls(calls: list[dict], *, with_ids: bool = True) -> None:
    """Every completion's answer is its own prompt's; the token ids came with the completions when expected."""
    assert calls
    for call in calls:
        assert len(call["answer"]) == len(call["prompts"]) == call["n"]
        for prompt, answer in zip(call["prompts"], call["answer"]):
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            assert re.search(r"out (\d+)\.", text).group(1) == answer
        assert (
            (call["ids"] is not None and len(call["ids"]) == call["n"]) if with_ids else call["ids"] is None
        )


def online(tmp_path, model, data, rewards, cls, **overrides):
    base = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / "out"),
        rewards=rewards,
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
    return cls(**{**base, **overrides})


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_and_rloo_pass_the_columns_and_the_step(tmp_path, tiny_model_dir, spy, advantage):
    """2 steps of 4 prompts x G 2 (8 completions a call, each prompt's answer twice), then the eval prompts
    (eval_steps=1: the eval after each step scores them with their own columns)."""
    rewards, calls = spy
    data = write_rows(tmp_path / "p.jsonl", 12)
    cfg = online(
        tmp_path,
        tiny_model_dir,
        data,
        rewards,
        GRPOConfig,
        num_generations=2,
        advantage=advantage,
        beta=0.0,
        eval_fraction=0.25,
        eval_steps=1,
    )
    grpo.train(cfg)
    recorded = calls()
    check_calls(recorded)
    train = [c for c in recorded if c["n"] == 8]
    assert [c["step"] for c in train] == [0, 1]
    assert [c["max_steps"] for c in train] == [2, 2]  # trainer_state.global_step / max_steps: the progress
    assert all(c["answer"][0] == c["answer"][1] for c in train)  # a group shares its row's columns
    assert any(c["n"] == 3 for c in recorded)  # the 3 eval prompts, one sample each


def test_ppo_passes_the_columns(tmp_path, tiny_model_dir, spy):
    rewards, calls = spy
    grpo_free = online(
        tmp_path, tiny_model_dir, write_rows(tmp_path / "p.jsonl"), rewards, PPOConfig, kl_coef=0.0
    )
    ppo.train(grpo_free)
    check_calls(calls())
    assert [c["step"] for c in calls()] == [0, 1]


def test_online_dpo_passes_the_columns(tmp_path, tiny_model_dir, spy):
    rewards, calls = spy
    cfg = online(
        tmp_path,
        tiny_model_dir,
        write_rows(tmp_path / "p.jsonl"),
        rewards,
        OnlineDPOConfig,
        num_generations=2,
    )
    online_dpo.train(cfg)
    check_calls(calls())


def test_iterative_dpo_passes_the_columns(tmp_path, tiny_model_dir, spy):
    rewards, calls = spy
    cfg = online(
        tmp_path,
        tiny_model_dir,
        write_rows(tmp_path / "p.jsonl"),
        rewards,
        IterativeDPOConfig,
        rounds=1,
        num_generations=2,
        max_steps=1,
        warmup_ratio=0.0,
    )
    iterative.train(cfg)
    check_calls(calls())


def test_generate_passes_the_columns(tmp_path, tiny_model_dir, spy):
    rewards, calls = spy
    cfg = GenerateConfig(
        model=str(tiny_model_dir),
        prompts=write_rows(tmp_path / "p.jsonl", 5),
        rewards=rewards,
        n=3,
        generation=GenerationSettings(max_new_tokens=4),
        chunk_prompts=2,
        output_dir=str(tmp_path / "gen"),
        progress=False,
    )
    best_of_n.run(cfg)
    check_calls(calls())
    assert sum(c["n"] for c in calls()) == 15


def test_score_passes_the_rows_other_columns(tmp_path, spy):
    """No token ids in `alignkit score` (completion_ids None); a row without the column fails as file:line
    after the sources are built, before anything is scored."""
    rewards, calls = spy
    data = tmp_path / "responses.jsonl"
    rows = [{"prompt": f"Tom went out {i}.", "response": "x" * i, "answer": str(i)} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ScoreConfig(
        rewards=rewards, data=str(data), output=str(tmp_path / "scored.jsonl"), batch_size=2, progress=False
    )
    score_command.run(cfg)
    check_calls(calls(), with_ids=False)
    assert [c["n"] for c in calls()] == [2, 2, 1]
    scored = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert [r["score_spy"] for r in scored] == [0.0, 1.0, 2.0, 3.0, 4.0] and scored[0]["answer"] == "0"
    data.write_text(data.read_text() + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match=r"responses.jsonl:6: field 'answer': missing"):
        score_command.run(ScoreConfig(**{**cfg.__dict__, "output": str(tmp_path / "scored2.jsonl")}))


def test_eval_passes_the_columns(tmp_path, tiny_model_dir, spy):
    rewards, calls = spy
    cfg = EvalConfig(
        base_model=str(tiny_model_dir),
        model=str(TINYSTORIES),
        prompts=write_rows(tmp_path / "p.jsonl", 3),
        rewards=rewards,
        num_samples=2,
        generation=GenerationSettings(max_new_tokens=4),
        output_dir=str(tmp_path / "eval"),
    )
    eval_command.run(cfg)
    check_calls(calls())
    assert [c["n"] for c in calls()] == [12]  # both models' 3 x 2 samples in one call


def test_a_missing_column_is_reported_at_every_row_or_skipped(tmp_path, tokenizer):
    """Rows 3 and 5 lack `answer`: one error listing both as file:line; on_bad_rows=skip keeps the other 4 and
    lists the two in dropped_rows.jsonl; a .json list of strings has no columns."""
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"Tom went out {i}. It was", "answer": str(i)} for i in range(6)]
    del rows[2]["answer"], rows[4]["answer"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompt_rows(str(path), tokenizer=tokenizer)[1].columns == {"answer": "1"}
    with pytest.raises(DataError, match=r"p.jsonl:3, 5: field 'answer': missing \(a reward source reads"):
        load_prompt_rows(str(path), tokenizer=tokenizer, columns=("answer",))
    cfg = GRPOConfig(model="m", data=str(path), output_dir=str(tmp_path / "run"), on_bad_rows="skip")
    prompts = load_prompts(cfg, tokenizer, log=lambda *_: None, columns=("answer",))
    assert [r.columns["answer"] for r in prompts.train_rows] == ["0", "1", "3", "5"]
    dropped = [json.loads(line) for line in open(tmp_path / "run" / "dropped_rows.jsonl")]
    assert [d["line"] for d in dropped] == [3, 5]
    strings = tmp_path / "list.json"
    strings.write_text(json.dumps(["Once upon a time", "Tom went"]))
    with pytest.raises(DataError, match="list.json:1.*field 'answer': missing"):
        load_prompt_rows(str(strings), tokenizer=tokenizer, columns=("answer",))
