"""Reading and validating preference / SFT rows: every format, every error message, the real HH file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignkit.data.chat import render_messages, split_hh
from alignkit.data.load import load_preference_rows, load_sft_rows
from alignkit.data.readers import DataError, read_records
from alignkit.data.rows import PreferenceRow, SFTRow

HH_FILE = Path(__file__).resolve().parents[1] / "examples" / "data" / "hh-harmless-1600.jsonl"

# A small chat template in the style of real ones: role tags, an end-of-turn marker, and a
# generation prompt that opens the assistant turn.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Renders a finished assistant turn differently from the generation prompt ("<|bot|>" vs
# "<|assistant|>"), so the full conversation does not start with the rendered prompt.
NON_EXTENDING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|bot|>{% else %}<|{{ m['role'] }}|>{% endif %}"
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Refuses system messages, as some real templates do.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None):
    """A tiny word-level fast tokenizer built locally (no hub), optionally with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "hello": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def write_jsonl(path: Path, records: list) -> str:
    """One JSON value per line; a str in `records` is written verbatim (blank or broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def data_error(load, path: str, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load(path, **kwargs)
    return info.value


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------------------------
# reading


def test_jsonl_text_rows_keep_file_lines_and_ignore_extra_keys(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Q1", "chosen": " good", "rejected": " bad", "id": 7, "meta": {"src": "x"}},
            "",
            {"prompt": "Q2", "chosen": "yes", "rejected": "no", "preference": 0.75},
        ],
    )
    data = load_preference_rows(path)
    assert data.dropped == []
    assert data.rows == [
        PreferenceRow("Q1", " good", " bad", None, path, 1),
        PreferenceRow("Q2", "yes", "no", 0.75, path, 3),
    ]


def test_json_array_rows_are_numbered_by_element(tmp_path):
    path = tmp_path / "pairs.json"
    rows = [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    path.write_text(json.dumps(rows, indent=2))
    data = load_preference_rows(str(path))
    assert [(r.prompt, r.line) for r in data.rows] == [("Q0", 1), ("Q1", 2), ("Q2", 3)]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.json", [{"prompt": "a", "completion": "b"}, "", {"prompt": "c", "completion": "d"}]
    )
    assert read_records(path) == [
        (1, {"prompt": "a", "completion": "b"}),
        (3, {"prompt": "c", "completion": "d"}),
    ]


def test_json_file_holding_one_pretty_printed_object_is_an_error(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"data": [{"prompt": "a", "completion": "b"}]}, indent=2))
    err = data_error(read_records, str(path))
    assert str(err) == (
        f"{path}: the file is one JSON object (expected a JSON array of row objects, or one object per line)"
    )


def test_parquet_rows_with_null_optional_columns(tmp_path):
    import pandas as pd

    path = tmp_path / "pairs.parquet"
    pd.DataFrame(
        {"prompt": ["P1", "P2"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"], "preference": [0.9, None]}
    ).to_parquet(path)
    data = load_preference_rows(str(path))
    assert [(r.prompt, r.chosen, r.rejected, r.preference, r.line) for r in data.rows] == [
        ("P1", "c1", "r1", 0.9, 1),
        ("P2", "c2", "r2", None, 2),
    ]


def test_saved_hugging_face_dataset_directory_and_split(tmp_path):
    import datasets

    splits = {
        "train": datasets.Dataset.from_list([{"prompt": "t", "completion": "x"}]),
        "test": datasets.Dataset.from_list(
            [{"prompt": "u", "completion": "y"}, {"prompt": "v", "completion": "z"}]
        ),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    rows = load_sft_rows(str(tmp_path / "ds"), split="test")
    assert [(r.prompt, r.completion, r.line) for r in rows] == [("u", "y", 1), ("v", "z", 2)]
    assert [r.prompt for r in load_sft_rows(str(tmp_path / "ds"))] == ["t"]  # split defaults to train
    err = data_error(load_sft_rows, str(tmp_path / "ds"), split="validation")
    assert "split 'validation' not found (available: train, test)" in str(err)


def test_missing_file_unsupported_type_and_split_ignored_for_a_file(tmp_path):
    err = data_error(read_records, str(tmp_path / "nope.jsonl"))
    assert str(err).startswith(f"{tmp_path / 'nope.jsonl'}: file not found")
    assert err.line is None

    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    assert "unsupported file type '.csv' (expected .jsonl, .json or .parquet" in str(
        data_error(read_records, str(csv))
    )

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    # a file is one split: the split (configs default eval_split to "test") does not apply to it
    assert read_records(path, split="test") == [(1, {"prompt": "a", "completion": "b"})]


def test_invalid_json_lines_are_all_reported_with_their_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{oops", "[1, 2]", '{"x": '],
    )
    err = data_error(read_records, path)
    assert err.count == 3
    lines = str(err).splitlines()
    assert lines[0] == f"{path}: 3 problems in 3 rows; fix them and rerun:"
    assert lines[1].startswith(f"  {path}:2: invalid JSON: Expecting property name enclosed in double quotes")
    assert lines[2] == f"  {path}:3: found a JSON list (expected one JSON object per line)"
    assert lines[3].startswith(f"  {path}:4: invalid JSON: Expecting value at column 6")


def test_json_array_problems_and_bad_utf8_name_their_rows(tmp_path):
    array = tmp_path / "pairs.json"
    array.write_text('[{"prompt": "a", "completion": "b"}, "oops", 3]')
    err = data_error(read_records, str(array))
    assert err.count == 2 and err.line == 2
    assert f"  {array}:3: found a JSON number (expected an array of JSON objects)" in str(err)

    array.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    assert (
        str(data_error(read_records, str(array))) == f"{array}:3: invalid JSON: Expecting value at column 14"
    )

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    assert f"{jsonl}:2: not valid UTF-8 (invalid start byte at byte 12)" in str(
        data_error(read_records, str(jsonl))
    )


def test_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", ["", "   "])
    assert (
        str(data_error(load_preference_rows, path))
        == f"{path}: no usable preference rows (the source is empty)"
    )
    assert str(data_error(load_sft_rows, path)) == f"{path}: no usable SFT rows (the source is empty)"


# --------------------------------------------------------------------------------------------
# conversational rows and chat templates


def test_render_messages_plain_default_matches_hh_transcripts():
    messages = [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello!"), user("Bye")]
    assert render_messages(None, messages, add_generation_prompt=True) == (
        "\n\nSystem: Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    )
    assert render_messages(make_tokenizer(None), messages[:3], add_generation_prompt=False) == (
        "\n\nSystem: Be kind.\n\nHuman: Hi\n\nAssistant: Hello!"
    )


def test_render_messages_uses_the_tokenizers_chat_template():
    tokenizer = make_tokenizer(TEMPLATE)
    assert (
        render_messages(tokenizer, [user("hi")], add_generation_prompt=True)
        == "<|user|>hi<|end|>\n<|assistant|>"
    )
    assert render_messages(tokenizer, [user("hi"), assistant("hello")], add_generation_prompt=False) == (
        "<|user|>hi<|end|>\n<|assistant|>hello<|end|>\n"
    )


def test_conversational_preference_rows_plain_default(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "S"}, user("Hi")],
                "chosen": assistant("Hello"),  # a bare message ...
                "rejected": [assistant("Go away")],  # ... or a list holding one
                "preference": 1,
            }
        ],
    )
    (row,) = load_preference_rows(path).rows
    assert (row.prompt, row.chosen, row.rejected, row.preference) == (
        "\n\nSystem: S\n\nHuman: Hi\n\nAssistant:",
        " Hello",
        " Go away",
        1.0,
    )


def test_conversational_preference_rows_with_a_chat_template(tmp_path):
    record = {"prompt": [user("hi")], "chosen": assistant("hello"), "rejected": [assistant("no")]}
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    (row,) = load_preference_rows(path, tokenizer=make_tokenizer(TEMPLATE)).rows
    assert (row.prompt, row.chosen, row.rejected) == (
        "<|user|>hi<|end|>\n<|assistant|>",
        "hello<|end|>\n",
        "no<|end|>\n",
    )
    # a tokenizer without a chat template falls back to the plain default
    (row,) = load_preference_rows(path, tokenizer=make_tokenizer(None)).rows
    assert (row.prompt, row.chosen) == ("\n\nHuman: hi\n\nAssistant:", " hello")


def test_template_that_does_not_extend_the_prompt_is_reported(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"prompt": [user("hi")], "chosen": assistant("a"), "rejected": assistant("b")}],
    )
    err = data_error(load_preference_rows, path, tokenizer=make_tokenizer(NON_EXTENDING_TEMPLATE))
    assert (err.line, err.field, err.count) == (1, "chosen", 1)
    assert (
        f"{path}:1: field 'chosen': cannot render with the chat template: the chat template does not extend the prompt"
        in str(err)
    )
    assert "(they differ at character 13: prompt has 'assistant|>', conversation has 'bot|>a\\n')" in str(err)


def test_template_exception_is_reported_at_its_row(tmp_path):
    record = {"prompt": [{"role": "system", "content": "S"}, user("hi")], "completion": assistant("a")}
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}, record])
    err = data_error(load_sft_rows, path, tokenizer=make_tokenizer(STRICT_TEMPLATE))
    assert (
        f"{path}:2: field 'completion': cannot render with the chat template: System role not supported"
        in str(err)
    )


# --------------------------------------------------------------------------------------------
# Anthropic HH


def test_split_hh_cuts_after_the_last_assistant_turn():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:"
    assert split_hh(prompt + " Knock knock.", prompt + " No.") == (prompt, " Knock knock.", " No.")


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        (
            "\n\nHuman: Hi",
            "\n\nHuman: Hi\n\nAssistant: x",
            "the chosen transcript has no '\\n\\nAssistant:' turn",
        ),
        (
            "\n\nHuman: Hi\n\nAssistant: x",
            "\n\nHuman: Hey\n\nAssistant: y",
            "differ at character 10, before their last",
        ),
        (
            "\n\nHuman: Hi\n\nAssistant: x",
            "\n\nHuman: Hi\n\nAssistant:  \n",
            "the rejected transcript's last assistant reply is empty",
        ),
        (
            "\n\nHuman: Hi\n\nAssistant:",
            "\n\nHuman: Hi\n\nAssistant: y",
            "the chosen transcript's last assistant reply is empty",
        ),
    ],
)
def test_split_hh_rejects_transcripts_that_do_not_split(chosen, rejected, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        split_hh(chosen, rejected)


def test_hh_rows_that_do_not_split_are_dropped_and_listed(tmp_path):
    good = {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"}
    empty = {"chosen": "\n\nHuman: Q\n\nAssistant: ", "rejected": "\n\nHuman: Q\n\nAssistant: no"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, empty, good])
    data = load_preference_rows(path)
    assert [(r.prompt, r.chosen, r.rejected, r.line) for r in data.rows] == [
        ("\n\nHuman: Q\n\nAssistant:", " yes", " no", 1),
        ("\n\nHuman: Q\n\nAssistant:", " yes", " no", 3),
    ]
    assert [str(d) for d in data.dropped] == [
        f"{path}:2: the chosen transcript's last assistant reply is empty"
    ]

    only_bad = write_jsonl(tmp_path / "bad.jsonl", [empty])
    err = data_error(load_preference_rows, only_bad)
    assert f"no usable preference rows (all 1 rows were dropped, e.g. {only_bad}:1:" in str(err)


def test_real_hh_file_loads_1595_rows_and_drops_exactly_five():
    data = load_preference_rows(str(HH_FILE))
    assert len(data.rows) == 1595
    dropped_lines = [
        int(re.match(rf"{re.escape(str(HH_FILE))}:(\d+): ", str(d)).group(1)) for d in data.dropped
    ]
    assert dropped_lines == [87, 517, 926, 1104, 1255]
    assert all("reply is empty" in d.reason for d in data.dropped[:4])
    assert "differ at character" in data.dropped[4].reason
    # prompt + completion reproduces the original transcript exactly
    first = json.loads(HH_FILE.read_text(encoding="utf-8").splitlines()[0])
    row = data.rows[0]
    assert row.line == 1 and row.prompt.endswith("\n\nAssistant:")
    assert (row.prompt + row.chosen, row.prompt + row.rejected) == (first["chosen"], first["rejected"])
    assert [r.line for r in data.rows[85:87]] == [86, 88]  # line numbers stay true after a drop


# --------------------------------------------------------------------------------------------
# pre-tokenised rows


def test_pre_tokenised_ids_pass_through(tmp_path):
    record = {
        "prompt": "p",
        "chosen": "c",
        "rejected": "r",
        "prompt_ids": [5, 6],
        "chosen_ids": [7],
        "rejected_ids": [8, 0],
    }
    (row,) = load_preference_rows(write_jsonl(tmp_path / "ids.jsonl", [record])).rows
    assert (row.prompt_ids, row.chosen_ids, row.rejected_ids) == ([5, 6], [7], [8, 0])


# --------------------------------------------------------------------------------------------
# validation messages: file:line, the field, what was wrong, what was expected

P = "pairs.jsonl"
CHAT = {"prompt": [user("hi")], "chosen": assistant("a"), "rejected": assistant("b")}

PREFERENCE_ERRORS = [
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing (expected a string, as 'prompt' is a string)"),
    ({"prompt": "p", "chosen": " \n", "rejected": "r"}, "chosen", "empty completion (expected non-whitespace text)"),
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen", "found number (expected a string, as 'prompt' is a string)"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "found number (expected a string or a list of messages)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "preference": 1.7}, "preference", "1.7 is out of range (expected a number in [0, 1])"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "preference": -0.1}, "preference", "-0.1 is out of range (expected a number in [0, 1])"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "preference": "high"}, "preference", "found string (expected a number in [0, 1])"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "preference": True}, "preference", "found boolean (expected a number in [0, 1])"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "margin", "found string (expected a finite number)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": False}, "margin", "found boolean (expected a finite number)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": float("inf")}, "margin", "inf is not finite (expected a finite number)"),
    ({**CHAT, "prompt": []}, "prompt", "empty list (expected at least one message)"),
    ({**CHAT, "prompt": [{"role": "human", "content": "hi"}]}, "prompt[0].role", "'human' is not a known role (expected one of 'system', 'developer', 'user', 'assistant', 'tool')"),
    ({**CHAT, "prompt": [{"content": "hi"}]}, "prompt[0].role", "missing (expected one of 'system'"),
    ({**CHAT, "prompt": [{"role": "user", "content": ["hi"]}]}, "prompt[0].content", "found list (expected a string)"),
    ({**CHAT, "prompt": ["hi"]}, "prompt[0]", "found string (expected a message object with 'role' and 'content')"),
    ({**CHAT, "chosen": user("a")}, "chosen.role", "'user' (expected 'assistant', as this is the reply)"),
    ({**CHAT, "rejected": [user("b")]}, "rejected[0].role", "'user' (expected 'assistant', as this is the reply)"),
    ({**CHAT, "chosen": [assistant("a"), assistant("b")]}, "chosen", "found a list of 2 messages (expected an assistant message or a list holding one assistant message)"),
    ({**CHAT, "chosen": assistant("  ")}, "chosen", "empty completion (expected non-whitespace text)"),
    ({**CHAT, "chosen": "a"}, "chosen", "found string (expected an assistant message or a list holding one assistant message)"),
    ({"prompt": [user("hi")], "rejected": assistant("b")}, "chosen", "missing (expected an assistant message or a list holding one assistant message)"),
    ({"chosen": [user("q"), assistant("a")], "rejected": "x"}, "chosen", "found list (expected a full HH transcript string, as there is no 'prompt' field)"),
    ({"rejected": "\n\nHuman: q\n\nAssistant: a"}, "chosen", "missing (expected a full HH transcript string, as there is no 'prompt' field)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "chosen_ids": [1], "rejected_ids": [2]}, "prompt_ids", "missing (expected all of prompt_ids, chosen_ids, rejected_ids or none; found chosen_ids, rejected_ids)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "prompt_ids": [1], "chosen_ids": [2, -3], "rejected_ids": [4]}, "chosen_ids", "element 1 is -3 (expected a list of non-negative integers)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": "4"}, "rejected_ids", "found string (expected a list of non-negative integers)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "prompt_ids": [1], "chosen_ids": [], "rejected_ids": [4]}, "chosen_ids", "empty list (expected at least one token id)"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "field", "problem"), PREFERENCE_ERRORS)
def test_preference_validation_error_names_line_field_and_expectation(tmp_path, record, field, problem):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / P, [good, good, record])
    err = data_error(load_preference_rows, path)
    assert (err.source, err.line, err.field, err.count) == (path, 3, field, 1)
    assert f"\n  {path}:3: field '{field}': {problem}" in str(err)


def test_margin_is_read_per_row_and_is_none_when_absent(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1.5},
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": [user("hi")], "chosen": assistant("a"), "rejected": assistant("b"), "margin": -2},
    ]
    data = load_preference_rows(write_jsonl(tmp_path / P, rows))
    assert [r.margin for r in data.rows] == [1.5, None, -2.0]


def test_unknown_row_format_lists_the_keys_found_and_the_formats_accepted(tmp_path):
    path = write_jsonl(tmp_path / P, [{"question": "q", "answer": "a"}])
    err = data_error(load_preference_rows, path)
    assert (err.line, err.field) == (1, None)
    assert (
        f"{path}:1: unknown row format: found keys ['answer', 'question'] (expected {{prompt: string"
        in str(err)
    )
    assert "Anthropic HH {chosen: transcript, rejected: transcript}" in str(err)


def test_all_problems_are_collected_before_raising(tmp_path):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    rows = [good, {"prompt": "p", "chosen": "c"}, good, {"prompt": "p", "chosen": "", "rejected": 1}]
    path = write_jsonl(tmp_path / P, rows)
    err = data_error(load_preference_rows, path)
    assert err.count == 3 and (err.line, err.field) == (2, "rejected")
    assert str(err).splitlines() == [
        f"{path}: 3 problems in 2 rows; fix them and rerun:",
        f"  {path}:2: field 'rejected': missing (expected a string, as 'prompt' is a string)",
        f"  {path}:4: field 'chosen': empty completion (expected non-whitespace text)",
        f"  {path}:4: field 'rejected': found number (expected a string, as 'prompt' is a string)",
    ]


def test_at_most_fifty_distinct_problems_are_listed_with_the_total(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "preference": 2 + i} for i in range(60)]
    path = write_jsonl(tmp_path / P, rows)
    err = data_error(load_preference_rows, path)
    lines = str(err).splitlines()
    assert lines[0] == f"{path}: 60 problems in 60 rows; fix them and rerun:"
    assert len(lines) == 52 and len(err.errors) == 50
    assert lines[50] == f"  {path}:50: field 'preference': 51 is out of range (expected a number in [0, 1])"
    assert lines[51] == "  ... and 10 more distinct problems"


def test_a_problem_met_on_many_rows_is_listed_once_with_its_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"  # wrong columns: every row has the same problem
    pq.write_table(pa.table({"question": ["q"] * 20, "answer": ["a"] * 20}), path)
    err = data_error(load_sft_rows, str(path))
    lines = str(err).splitlines()
    assert lines[0] == f"{path}: 20 problems in 20 rows; fix them and rerun:"
    assert len(lines) == 2 and lines[1].startswith(f"  {path}:1-20: unknown row format: found keys")
    assert lines[1].endswith("(20 rows)")


def test_invalid_json_does_not_hide_the_other_rows_problems(tmp_path):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(
        tmp_path / P, [good, '{"prompt": "p", "chosen": "c', {"prompt": "p", "chosen": " "}, good]
    )
    err = data_error(load_preference_rows, path)
    assert str(err).splitlines() == [
        f"{path}: 3 problems in 2 rows; fix them and rerun:",
        f"  {path}:2: invalid JSON: Unterminated string starting at column 27 (expected one JSON object per line)",
        f"  {path}:3: field 'chosen': empty completion (expected non-whitespace text)",
        f"  {path}:3: field 'rejected': missing (expected a string, as 'prompt' is a string)",
    ]


def test_on_bad_rows_skip_leaves_bad_rows_out_and_lists_them(tmp_path):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / P, [good, {"prompt": "p", "chosen": "", "rejected": "r"}, "{oops", good])
    skipped = []
    data = load_preference_rows(path, skipped=skipped)
    assert [r.line for r in data.rows] == [1, 4]
    assert [(d.line, d.reason.split(":")[0]) for d in skipped] == [(2, "field 'chosen'"), (3, "invalid JSON")]
    assert str(skipped[0]) == f"{path}:2: field 'chosen': empty completion (expected non-whitespace text)"
    with pytest.raises(DataError, match="file not found"):  # a problem of the whole source is still an error
        load_sft_rows(str(tmp_path / "missing.jsonl"), skipped=[])


def test_data_error_formats_its_location():
    assert str(DataError("bad", "f.jsonl", 3, "chosen")) == "f.jsonl:3: field 'chosen': bad"
    assert str(DataError("bad", "f.jsonl", 3)) == "f.jsonl:3: bad"
    assert str(DataError("bad", "f.jsonl")) == "f.jsonl: bad"
    assert isinstance(DataError("bad"), ValueError)


# --------------------------------------------------------------------------------------------
# SFT rows


def test_sft_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Once", "completion": " upon a time"},
            {"messages": [user("Hi"), assistant("Hello"), user("Joke?"), assistant("No.")]},
            {"prompt": [user("Hi")], "completion": assistant("Hey")},
            {"prompt": [user("Hi")], "completion": [assistant("Yo")], "source_id": 9},
        ],
    )
    rows = load_sft_rows(path)
    assert rows == [
        SFTRow("Once", " upon a time", path, 1),
        # earlier assistant turns are prompt; only the last reply is the completion
        SFTRow("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:", " No.", path, 2),
        SFTRow("\n\nHuman: Hi\n\nAssistant:", " Hey", path, 3),
        SFTRow("\n\nHuman: Hi\n\nAssistant:", " Yo", path, 4),
    ]


def test_sft_messages_with_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user("hi"), assistant("hello")]}])
    (row,) = load_sft_rows(path, tokenizer=make_tokenizer(TEMPLATE))
    assert (row.prompt, row.completion) == ("<|user|>hi<|end|>\n<|assistant|>", "hello<|end|>\n")


SFT_ERRORS = [
    ({"messages": [user("hi"), user("again")]}, "messages[1].role", "'user' (expected 'assistant', as this is the reply)"),
    ({"messages": [assistant("hello")]}, "messages", "found 1 message(s) (expected prompt messages, then the assistant's reply)"),
    ({"messages": "hi"}, "messages", "found string (expected prompt messages, then the assistant's reply)"),
    ({"messages": [{"role": "gpt", "content": "x"}, assistant("a")]}, "messages[0].role", "'gpt' is not a known role"),
    ({"messages": [user("hi"), assistant(" ")]}, "messages[1]", "empty completion (expected non-whitespace text)"),
    ({"prompt": "p"}, "completion", "missing (expected a string, as 'prompt' is a string)"),
    ({"prompt": "p", "completion": ""}, "completion", "empty completion (expected non-whitespace text)"),
    ({"completion": "c"}, "prompt", "missing (expected a string or a list of messages)"),
    ({"prompt": [user("hi")], "completion": "c"}, "completion", "found string (expected an assistant message or a list holding one assistant message)"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "field", "problem"), SFT_ERRORS)
def test_sft_validation_error_names_line_field_and_expectation(tmp_path, record, field, problem):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}, record])
    err = data_error(load_sft_rows, path)
    assert (err.line, err.field) == (2, field)
    assert f"\n  {path}:2: field '{field}': {problem}" in str(err)


def test_sft_unknown_format_and_ambiguous_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"text": "x"}, {"messages": [user("a"), assistant("b")], "prompt": "p"}]
    )
    err = data_error(load_sft_rows, path)
    assert (
        f"{path}:1: unknown row format: found keys ['text'] (expected {{prompt: string, completion: string}}"
        in str(err)
    )
    assert f"{path}:2: row has both 'messages' and 'prompt' (expected one SFT format per row)" in str(err)
