"""on_bad_rows=skip, and warnings about valid rows that are probably mistakes (issue 11, items 6 and 8)."""

import json

import pytest

from alignkit.cli import main
from alignkit.data.checks import duplicate_rows, lost_share, unknown_text_rows
from alignkit.data.prompts import load_prompt_rows
from alignkit.data.rows import SFTRow
from alignkit.models.load import load_tokenizer
from tests.conftest import TINYSTORIES


def write_lines(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    )
    return str(path)


def test_skip_trains_on_the_good_rows_and_lists_every_dropped_one(tmp_path, tiny_model_dir, capsys):
    good = [{"prompt": f"Tom had {i} apples.", "completion": f" He ate {i % 3}."} for i in range(16)]
    rows = good[:5] + [{"prompt": "Sue sang.", "completion": " "}, "{oops"] + good[5:] + [{"prompt": "Hi."}]
    data = write_lines(tmp_path / "rows.jsonl", rows)
    args = ["sft", f"model={tiny_model_dir}", f"data={data}", "batch_size=4", "max_steps=2", "progress=false"]
    args += ["max_length=48", "max_prompt_length=24", "mixed_precision=no"]

    assert main([*args, f"output_dir={tmp_path}/refused"]) == 1  # the default refuses, listing all three
    err = capsys.readouterr().err
    assert f"{data}: 3 problems in 3 rows" in err
    assert (
        f"{data}:6: field 'completion'" in err and f"{data}:7: invalid JSON" in err and f"{data}:19:" in err
    )

    out = tmp_path / "skipped"
    assert main([*args, f"output_dir={out}", "on_bad_rows=skip"]) == 0
    printed = capsys.readouterr().out
    dropped = [json.loads(line) for line in (out / "dropped_rows.jsonl").read_text().splitlines()]
    assert [(d["source"], d["line"]) for d in dropped] == [(data, 6), (data, 7), (data, 19)]
    assert dropped[0]["reason"] == "field 'completion': empty completion (expected non-whitespace text)"
    assert f"3 rows left out of the run (listed in {out / 'dropped_rows.jsonl'})" in printed
    for d in dropped:
        assert f"  {data}:{d['line']}: {d['reason']}" in printed
    assert "train: 16 examples;" in printed and "3 rows left out (see above)" in printed


def test_duplicates_and_text_the_tokenizer_cannot_represent_are_warned_about(
    tmp_path, tiny_model_dir, capsys
):
    rows = [{"prompt": f"Tom had {i} apples.", "completion": f" He ate {i}."} for i in range(8)]
    rows += [rows[2], rows[2], {"prompt": "Жили-были дед и баба.", "completion": " Была у них курочка Ряба."}]
    data = write_lines(tmp_path / "rows.jsonl", rows)
    args = ["sft", f"model={tiny_model_dir}", f"data={data}", "batch_size=4", "max_steps=1", "progress=false"]
    assert main([*args, f"output_dir={tmp_path}/o", "max_length=48", "max_prompt_length=24"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"warning: 2 rows repeat an earlier row exactly ({data}:9 repeats {data}:3; {data}:10 repeats"
        in printed
    )
    assert (
        f"warning: 1 rows are mostly text this tokenizer cannot represent ({data}:11 (92% lost))" in printed
    )


def test_the_checks_are_pure_functions_of_rows():
    tokenizer = load_tokenizer(str(TINYSTORIES))
    assert lost_share("Once upon a time, Lily smiled.", tokenizer) == 0.0
    assert lost_share("日本語のテキスト", tokenizer) == 1.0
    rows = [SFTRow("a", "b", "f", 1), SFTRow("a", "b", "f", 2), SFTRow("a", "c", "f", 3)]
    assert duplicate_rows(rows)[0].startswith(
        "warning: 1 rows repeat an earlier row exactly (f:2 repeats f:1)"
    )
    assert duplicate_rows(rows[1:]) == [] and unknown_text_rows(rows, tokenizer) == []


def test_score_warns_about_empty_and_repeated_responses(tmp_path, capsys):
    rows = [{"prompt": "p", "response": r} for r in ["good", "", "good", "  "]]
    data = write_lines(tmp_path / "rows.jsonl", rows)
    args = [
        "score",
        f"data={data}",
        f"output={tmp_path}/s.jsonl",
        "rewards=[{type: length}]",
        "progress=false",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"warning: 2 rows have an empty 'response' ({data}:2, 4)" in printed
    assert f"warning: 1 rows repeat an earlier row's prompt and response ({data}:3)" in printed
    assert f"summary written to {tmp_path / 's.summary.json'}" in printed  # where docs/rewards.md says
    assert (tmp_path / "s.summary.json").is_file()


def test_prompt_rows_can_be_skipped(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "A"}, {"prompt": ""}, {"prompt": "B"}])
    skipped = []
    assert [r.prompt for r in load_prompt_rows(path, skipped=skipped)] == ["A", "B"]
    assert [str(d) for d in skipped] == [
        f"{path}:2: field 'prompt': empty prompt (expected non-whitespace text)"
    ]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(["A", " ", "B"]))
    skipped = []
    assert [r.line for r in load_prompt_rows(str(listed), skipped=skipped)] == [1, 3]
    assert [d.line for d in skipped] == [2]


def test_online_training_skips_bad_prompt_rows_and_lists_them(tmp_path, tiny_model_dir, capsys):
    """grpo and ppo with on_bad_rows=skip: the bad prompt rows are left out, listed in the log and in
    dropped_rows.jsonl, and the run trains on the rest."""
    rows = [{"prompt": f"Tom went out {i}."} for i in range(8)]
    rows[3] = {"prompt": ""}
    rows[5] = {"question": "x"}
    prompts = write_lines(tmp_path / "prompts.jsonl", rows)
    common = [
        f"model={tiny_model_dir}",
        f"data={prompts}",
        "rewards=[{type: vader}]",
        "generation.max_new_tokens=4",
    ]
    small = ["batch_size=2", "max_steps=1", "progress=false", "on_bad_rows=skip"]
    for command, extra in (("grpo", ["num_generations=2"]), ("ppo", ["ppo_epochs=1"])):
        out = tmp_path / command
        assert main([command, *common, *small, *extra, f"output_dir={out}"]) == 0
        dropped = [json.loads(line) for line in (out / "dropped_rows.jsonl").read_text().splitlines()]
        assert [(d["line"], "prompt" in d["reason"]) for d in dropped] == [(4, True), (6, True)]
        assert "2 rows left out of the run" in capsys.readouterr().out
        assert (out / "final").is_dir()


def test_a_lone_surrogate_in_any_text_field_is_reported_at_its_row_and_field(tmp_path):
    """JSON's \\u escapes can write half a UTF-16 pair ("x\\ud800"): Python reads it as a str that no
    tokenizer can encode. Every row format refuses it when the rows are read, naming file:line:field,
    rather than failing with a traceback in the tokenizer or the unknown-text warning later."""
    from alignkit.data.load import (
        load_listwise_rows,
        load_logged_rows,
        load_preference_rows,
        load_sft_rows,
        load_unpaired_rows,
    )
    from alignkit.data.readers import DataError

    bad = "x\ud800"
    user = {"role": "user", "content": "Hi."}
    cases = [
        (load_preference_rows, {"prompt": "P.", "chosen": bad, "rejected": "R."}, "chosen"),
        (
            load_preference_rows,
            {
                "prompt": [user, {"role": "user", "content": bad}],
                "chosen": {"role": "assistant", "content": "A."},
                "rejected": {"role": "assistant", "content": "B."},
            },
            "prompt[1].content",
        ),  # noqa: E501
        (
            load_preference_rows,
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": f"\n\nHuman: a\n\nAssistant: {bad}"},
            "rejected",
        ),  # noqa: E501
        (load_sft_rows, {"prompt": bad, "completion": " c"}, "prompt"),
        (load_sft_rows, {"messages": [user, {"role": "assistant", "content": bad}]}, "messages[1].content"),
        (load_unpaired_rows, {"prompt": "P.", "completion": bad, "label": True}, "completion"),
        (load_logged_rows, {"prompt": "P.", "response": bad, "reward": 1.0}, "response"),
        (load_listwise_rows, {"prompt": "P.", "responses": ["a", bad], "scores": [1, 2]}, "responses[1]"),
        (load_prompt_rows, {"prompt": bad}, "prompt"),
        (load_prompt_rows, {"messages": [{"role": "user", "content": bad}]}, "messages[0].content"),
    ]
    for load, record, field in cases:
        path = tmp_path / "rows.jsonl"
        # json.dumps writes the lone surrogate as the escape \ud800, as a file from elsewhere would;
        # line 1 is the same row without it
        line = json.dumps(record)
        path.write_text(line.replace("\\ud800", "") + "\n" + line + "\n")
        with pytest.raises(DataError) as info:
            load(str(path))
        assert f"{path}:2: field '{field}'" in str(info.value), (load.__name__, str(info.value))
        assert "surrogate" in str(info.value)
    from alignkit.config.tools import ScoreConfig  # `alignkit score` and ICDPO's demos
    from alignkit.rewards.score import read_pairs

    path.write_text(
        json.dumps({"prompt": "P.", "response": "fine"})
        + "\n"
        + json.dumps({"prompt": bad, "response": "R."})
        + "\n"
    )
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'prompt': .*surrogate"):
        read_pairs(ScoreConfig(data=str(path)))
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(["fine", bad]))
    with pytest.raises(DataError, match=r"prompts.json:2: .*surrogate"):
        load_prompt_rows(str(listed))
