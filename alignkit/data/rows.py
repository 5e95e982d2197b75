"""Reading rows from disk or the Hugging Face hub, and validating them before training starts.

Every problem in a file is collected and reported at once, in one :class:`DataError` whose message
names ``file:line``, the field, what was wrong and what was expected, so a user fixes a file in
one pass rather than one crash per bad row.

Preference rows (format detected per row; extra keys are ignored):

1. text: ``{"prompt": str, "chosen": str, "rejected": str}``
2. conversational: ``{"prompt": [messages], "chosen": message | [message], "rejected": ...}``; the
   replies are single assistant messages, rendered with :func:`render_messages`
3. Anthropic HH: ``{"chosen": transcript, "rejected": transcript}`` (no ``prompt``), split with
   :func:`split_hh`; rows that do not split are dropped and listed in ``PreferenceData.dropped``

Any format may carry ``preference`` (a number in [0, 1]: the probability that chosen really is
better), ``margin`` (a finite number: the implicit-reward margin chosen must win by, for reward-shaped
DPO; rows without one get 0) and pre-tokenised ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (all
three or none).

SFT rows: ``{"prompt": str, "completion": str}``; ``{"messages": [...]}`` whose last message is the
assistant's reply (the completion; everything before it is the prompt); or
``{"prompt": [messages], "completion": message | [message]}``.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.chat import Issues, conversation_texts, json_type, render_messages, split_hh

__all__ = [
    "DataError",
    "PreferenceData",
    "PreferenceRow",
    "SFTRow",
    "load_preference_rows",
    "load_sft_rows",
    "read_records",
    "render_messages",
    "split_hh",
]

MAX_REPORTED = 20  # problems listed in one DataError; the total count is always given
ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

PREFERENCE_FORMATS = (
    "{prompt: string, chosen: string, rejected: string}; "
    "{prompt: [messages], chosen: assistant message, rejected: assistant message}; "
    "or Anthropic HH {chosen: transcript, rejected: transcript}"
)
SFT_FORMATS = (
    "{prompt: string, completion: string}; {messages: [..., assistant message]}; "
    "or {prompt: [messages], completion: assistant message}"
)


class DataError(ValueError):
    """Bad input data. ``str(err)`` names source:line, the field, what was wrong and what was expected.

    Attributes: ``source`` (file or dataset name), ``line`` (1-based, or None when the whole source is
    at fault), ``field`` (or None). An error collected over a file lists up to ``MAX_REPORTED``
    problems; its ``line``/``field`` are those of the first, ``errors`` holds the listed ones and
    ``count`` the total.
    """

    def __init__(self, problem: str, source: str = "", line: int | None = None, field: str | None = None):
        self.problem, self.source, self.line, self.field = problem, source, line, field
        self.errors: list[DataError] = [self]
        self.count = 1
        where = f"{source}:{line}" if line is not None else source
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}: {what}" if where else what)


class _Problems:
    """Collects problems over a whole source so that one error can report them all."""

    def __init__(self, source: str):
        self.source = source
        self.shown: list[DataError] = []
        self.count = 0
        self.lines: set[int | None] = set()

    def add(self, line: int | None, field: str | None, problem: str) -> None:
        self.count += 1
        self.lines.add(line)
        if len(self.shown) < MAX_REPORTED:
            self.shown.append(DataError(problem, self.source, line, field))

    def raise_if_any(self) -> None:
        if not self.count:
            return
        listed = "\n".join(f"  {e}" for e in self.shown)
        more = f"\n  ... and {self.count - len(self.shown)} more" if self.count > len(self.shown) else ""
        header = (
            f"{self.count} problem{'s' if self.count > 1 else ''} in {len(self.lines)} "
            f"row{'s' if len(self.lines) > 1 else ''}; fix them and rerun:"
        )
        err = DataError(f"{header}\n{listed}{more}", self.source)
        err.line, err.field = self.shown[0].line, self.shown[0].field
        err.errors, err.count = self.shown, self.count
        raise err


@dataclass
class PreferenceRow:
    """One validated preference pair, as text (chat templates already applied)."""

    prompt: str
    chosen: str
    rejected: str
    preference: float | None = None
    source: str = ""
    line: int = 0
    prompt_ids: list[int] | None = None
    chosen_ids: list[int] | None = None
    rejected_ids: list[int] | None = None
    margin: float | None = None


@dataclass
class SFTRow:
    """One validated supervised example: the loss is taken on ``completion`` only."""

    prompt: str
    completion: str
    source: str = ""
    line: int = 0


@dataclass
class PreferenceData:
    """Validated preference rows, plus one ``"file:line: reason"`` per HH row that did not split."""

    rows: list[PreferenceRow]
    dropped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading


def read_records(source: str, split: str | None = None) -> list[tuple[int, dict]]:
    """``(line, record)`` pairs from a ``.jsonl``/``.json``/``.parquet`` file or a Hugging Face dataset.

    JSONL: ``line`` is the file line (blank lines skipped). A ``.json`` file holding an array: the
    1-based element number; any other ``.json`` is read as JSON lines. Parquet and datasets: the
    1-based row number. A directory written by ``save_to_disk`` is read with ``load_from_disk``;
    any other directory or a name that is not a local path goes to ``datasets.load_dataset(source,
    split=split or "train")``. ``split`` only applies to datasets: a file is one split, so it is
    not consulted for files (configs carry a default split for both).
    Raises DataError for a missing or unreadable file and, listing them all, for invalid JSON lines.
    """
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_dataset(source, split, path)
    if suffix not in FILE_SUFFIXES:
        if path.is_file():
            raise DataError(
                f"unsupported file type '{path.suffix}' (expected .jsonl, .json or .parquet, "
                "or a Hugging Face dataset name)",
                source,
            )
        return _read_dataset(source, split, None)
    if not path.is_file():
        raise DataError(f"file not found (looked for {path.resolve()})", source)
    if suffix == ".parquet":
        return _read_parquet(path, source)
    if suffix == ".json":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", source) from None
        if text.lstrip().startswith("["):
            return _read_json_array(text, source)
        if text.strip().count("\n") and _is_one_object(text):
            # A pretty-printed object would otherwise be reported line by line as invalid JSON.
            raise DataError(
                "the file is one JSON object (expected a JSON array of row objects, or one object per line)",
                source,
            )
    return _read_jsonl(path, source)


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:  # JSON lines fail fast here, with "Extra data" after the first row
        return False


def _read_jsonl(path: Path, source: str) -> list[tuple[int, dict]]:
    records, problems = [], _Problems(source)
    with open(path, "rb") as f:  # bytes, so a bad encoding is reported at its line
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problems.add(n, None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip())  # so an error column stays on this line
            except json.JSONDecodeError as e:
                problems.add(
                    n, None, f"invalid JSON: {e.msg} at column {e.colno} (expected one JSON object per line)"
                )
                continue
            if isinstance(record, dict):
                records.append((n, record))
            else:
                problems.add(n, None, f"found a JSON {json_type(record)} (expected one JSON object per line)")
    problems.raise_if_any()
    return records


def _read_json_array(text: str, source: str) -> list[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", source, e.lineno) from None
    problems = _Problems(source)
    for n, record in enumerate(data, 1):
        if not isinstance(record, dict):
            problems.add(n, None, f"found a JSON {json_type(record)} (expected an array of JSON objects)")
    problems.raise_if_any()
    return list(enumerate(data, 1))


def _read_parquet(path: Path, source: str) -> list[tuple[int, dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet: {e}", source) from e
    return list(enumerate(table.to_pylist(), 1))


def _read_dataset(source: str, split: str | None, directory: Path | None) -> list[tuple[int, dict]]:
    import datasets  # slow to import; only needed here

    split = split or "train"
    saved = directory is not None and any(
        (directory / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )
    try:
        if saved:
            dataset = datasets.load_from_disk(str(directory))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"split {split!r} not found (available: {', '.join(dataset)})", source)
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (not found, offline, bad split): say which
        raise DataError(
            f"could not load as a Hugging Face dataset (split {split!r}): {type(e).__name__}: {e} "
            f"(expected a .jsonl, .json or .parquet file, a saved dataset directory or a hub dataset name)",
            source,
        ) from e
    return [(n, dict(record)) for n, record in enumerate(dataset, 1)]


# ---------------------------------------------------------------------------------------------
# validating one record; each helper appends (field, reason) to `issues` and returns None on error


def _text(record: dict, key: str, issues: Issues, expected: str, completion: bool) -> str | None:
    value = record.get(key)
    if value is None:
        issues.append((key, f"missing (expected {expected})"))
    elif not isinstance(value, str):
        issues.append((key, f"found {json_type(value)} (expected {expected})"))
    elif completion and not value.strip():
        issues.append((key, "empty completion (expected non-whitespace text)"))
    else:
        return value
    return None


def _preference(record: dict, issues: Issues) -> float | None:
    value = record.get("preference")
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        issues.append(("preference", f"found {json_type(value)} (expected a number in [0, 1])"))
        return None
    if not 0 <= value <= 1:  # also rejects NaN
        issues.append(("preference", f"{value!r} is out of range (expected a number in [0, 1])"))
        return None
    return float(value)


def _margin(record: dict, issues: Issues) -> float | None:
    value = record.get("margin")
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        issues.append(("margin", f"found {json_type(value)} (expected a finite number)"))
        return None
    if not math.isfinite(value):
        issues.append(("margin", f"{value!r} is not finite (expected a finite number)"))
        return None
    return float(value)


def _token_ids(record: dict, issues: Issues) -> dict[str, list[int]]:
    present = [k for k in ID_FIELDS if record.get(k) is not None]
    if not present:
        return {}
    ids, expected = {}, "expected a list of non-negative integers"
    for key in ID_FIELDS:
        value = record.get(key)
        if value is None:
            found = ", ".join(present)
            issues.append((key, f"missing (expected all of {', '.join(ID_FIELDS)} or none; found {found})"))
        elif not isinstance(value, (list, tuple)):
            issues.append((key, f"found {json_type(value)} ({expected})"))
        elif bad := [i for i, t in enumerate(value) if not _is_token_id(t)]:
            issues.append((key, f"element {bad[0]} is {value[bad[0]]!r} ({expected})"))
        elif not value and key != "prompt_ids":  # an empty prompt can be valid; an empty reply cannot
            issues.append((key, "empty list (expected at least one token id)"))
        else:
            ids[key] = [int(t) for t in value]
    return ids


def _is_token_id(t: Any) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0


def _preference_row(record: dict, tokenizer: Any, issues: Issues) -> PreferenceRow | str | None:
    """A row; or, for an HH row that does not split, the reason as a string; or None with issues."""
    n_issues = len(issues)
    preference = _preference(record, issues)
    margin = _margin(record, issues)
    ids = _token_ids(record, issues)
    prompt = record.get("prompt")
    texts = None
    if isinstance(prompt, str):
        expected = "a string, as 'prompt' is a string"
        chosen = _text(record, "chosen", issues, expected, completion=True)
        rejected = _text(record, "rejected", issues, expected, completion=True)
        texts = (prompt, chosen, rejected)
    elif isinstance(prompt, list):
        replies = [("chosen", record.get("chosen")), ("rejected", record.get("rejected"))]
        texts = conversation_texts(tokenizer, prompt, replies, issues)
    elif prompt is not None:
        issues.append(("prompt", f"found {json_type(prompt)} (expected a string or a list of messages)"))
    elif record.get("chosen") is None and record.get("rejected") is None:
        issues.append(
            (None, f"unknown row format: found keys {sorted(record)} (expected {PREFERENCE_FORMATS})")
        )
    else:
        expected = "a full HH transcript string, as there is no 'prompt' field"
        chosen = _text(record, "chosen", issues, expected, completion=False)
        rejected = _text(record, "rejected", issues, expected, completion=False)
        if len(issues) == n_issues:
            try:
                texts = split_hh(chosen, rejected)
            except ValueError as e:
                return str(e)
    if len(issues) > n_issues:
        return None
    return PreferenceRow(*texts, preference=preference, margin=margin, **ids)


def _sft_row(record: dict, tokenizer: Any, issues: Issues) -> SFTRow | None:
    """A row, or None with the problems appended to ``issues``."""
    n_issues = len(issues)
    messages, prompt = record.get("messages"), record.get("prompt")
    texts = None
    if messages is not None and prompt is not None:
        issues.append((None, "row has both 'messages' and 'prompt' (expected one SFT format per row)"))
    elif messages is not None:
        if not isinstance(messages, list) or len(messages) < 2:
            found = f"{len(messages)} message(s)" if isinstance(messages, list) else json_type(messages)
            issues.append(
                ("messages", f"found {found} (expected prompt messages, then the assistant's reply)")
            )
        else:
            last = len(messages) - 1
            reply = [(f"messages[{last}]", messages[last])]
            texts = conversation_texts(tokenizer, messages[:last], reply, issues, prompt_field="messages")
    elif isinstance(prompt, str):
        completion = _text(record, "completion", issues, "a string, as 'prompt' is a string", completion=True)
        texts = (prompt, completion)
    elif isinstance(prompt, list):
        texts = conversation_texts(tokenizer, prompt, [("completion", record.get("completion"))], issues)
    elif prompt is not None:
        issues.append(("prompt", f"found {json_type(prompt)} (expected a string or a list of messages)"))
    elif record.get("completion") is not None:
        issues.append(("prompt", "missing (expected a string or a list of messages)"))
    else:
        issues.append((None, f"unknown row format: found keys {sorted(record)} (expected {SFT_FORMATS})"))
    if len(issues) > n_issues:
        return None
    return SFTRow(*texts)


# ---------------------------------------------------------------------------------------------
# loading


def load_preference_rows(source: str, split: str | None = None, tokenizer: Any = None) -> PreferenceData:
    """Read and validate preference rows from ``source`` (see :func:`read_records`).

    Conversational rows are rendered with ``tokenizer``'s chat template, or the plain default when
    it has none or is None. HH rows that do not split are dropped and listed in ``dropped``; every
    other problem is collected over the whole source and raised as one DataError, as is a source
    with no usable rows.
    """
    records = read_records(source, split)
    problems, rows, dropped = _Problems(source), [], []
    for line, record in records:
        issues: Issues = []
        row = _preference_row(record, tokenizer, issues)
        for key, reason in issues:
            problems.add(line, key, reason)
        if isinstance(row, str):
            dropped.append(f"{source}:{line}: {row}")
        elif row is not None:
            row.source, row.line = source, line
            rows.append(row)
    problems.raise_if_any()
    if not rows:
        why = f"all {len(dropped)} rows were dropped, e.g. {dropped[0]}" if dropped else "the source is empty"
        raise DataError(f"no usable preference rows ({why})", source)
    return PreferenceData(rows, dropped)


def load_sft_rows(source: str, split: str | None = None, tokenizer: Any = None) -> list[SFTRow]:
    """Read and validate SFT rows from ``source`` (see :func:`read_records`).

    For ``messages`` rows only the final assistant reply is the completion; earlier turns (assistant
    ones included) are prompt. All problems are collected and raised as one DataError, as is an
    empty source.
    """
    records = read_records(source, split)
    problems, rows = _Problems(source), []
    for line, record in records:
        issues: Issues = []
        row = _sft_row(record, tokenizer, issues)
        for key, reason in issues:
            problems.add(line, key, reason)
        if row is not None:
            row.source, row.line = source, line
            rows.append(row)
    problems.raise_if_any()
    if not rows:
        raise DataError("no usable SFT rows (the source is empty)", source)
    return rows
