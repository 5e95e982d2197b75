"""Reading raw records from files and datasets, and the error type that names file:line:field.

`read_records` turns a .jsonl/.json/.parquet file, a saved dataset folder or a Hugging Face dataset name
into (line, record) pairs; `DataError` and `Problems` collect every problem of a file into one error.
Validation of the records' fields lives in alignkit.data.parse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.chat import json_type

MAX_REPORTED = 50  # distinct problems listed in one DataError; the total count is always given
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Bad input data. ``str(err)`` names source:line, the field, what was wrong and what was expected.

    Attributes: ``source`` (file or dataset name), ``line`` (1-based, or None when the whole source is
    at fault), ``field`` (or None). An error collected over a file lists up to ``MAX_REPORTED`` distinct
    problems (one problem met on many rows is listed once, with its rows); its ``line``/``field`` are those
    of the first, ``errors`` holds the listed ones and ``count`` the total.
    """

    def __init__(
        self,
        problem: str,
        source: str = "",
        line: int | None = None,
        field: str | None = None,
        *,
        lines: list[int] | None = None,
    ):
        self.problem, self.source, self.line, self.field = problem, source, line, field
        self.errors: list[DataError] = [self]
        self.count = 1
        where = f"{source}:{line_ranges(lines)}" if lines and len(lines) > 1 else source
        if line is not None and not (lines and len(lines) > 1):
            where = f"{source}:{line}"
        what = f"field '{field}': {problem}" if field else problem
        if lines and len(lines) > 1:
            what += f" ({len(lines)} rows)"
        super().__init__(f"{where}: {what}" if where else what)


def line_ranges(lines: list[int], most: int = 10) -> str:
    """'1-20' or '3, 7, 12-14' (at most `most` runs, then '...') for sorted line numbers."""
    runs: list[list[int]] = []
    for n in lines:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:most])
    return text + (", ..." if len(runs) > most else "")


@dataclass(frozen=True)
class DroppedRow:
    """A row left out of a run (on_bad_rows=skip, or an HH transcript that does not split): where and why."""

    source: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


class Problems:
    """Collects problems over a whole source so that one error can report them all; the same problem on
    many rows is reported once, with its rows."""

    def __init__(self, source: str):
        self.source = source
        self.groups: dict[tuple[str | None, str], list[int | None]] = {}
        self.by_line: dict[int | None, list[str]] = {}
        self.count = 0

    @property
    def lines(self) -> set[int | None]:
        """The rows (None: the whole source) with a problem."""
        return set(self.by_line)

    def add(self, line: int | None, field: str | None, problem: str) -> None:
        self.count += 1
        self.groups.setdefault((field, problem), []).append(line)
        self.by_line.setdefault(line, []).append(f"field '{field}': {problem}" if field else problem)

    @property
    def shown(self) -> list[DataError]:
        """The first MAX_REPORTED distinct problems, each with the rows it was met on."""
        out = []
        in_file_order = sorted(self.groups.items(), key=lambda g: (g[1][0] is not None, g[1][0] or 0))
        for (field, problem), lines in in_file_order[:MAX_REPORTED]:
            numbered = [n for n in lines if n is not None]
            out.append(
                DataError(
                    problem, self.source, lines[0], field, lines=numbered if len(numbered) > 1 else None
                )
            )
        return out

    def dropped(self) -> list[DroppedRow]:
        """One DroppedRow per row with a problem, its reasons joined (for on_bad_rows=skip)."""
        return [
            DroppedRow(self.source, n, "; ".join(r)) for n, r in sorted(self.by_line.items()) if n is not None
        ]

    def raise_if_any(self, skip: bool = False) -> None:
        """DataError listing the problems, if any; with `skip`, only for problems of the whole source."""
        if not self.count or (skip and None not in self.by_line):
            return
        shown = self.shown
        listed = "\n".join(f"  {e}" for e in shown)
        more = len(self.groups) - len(shown)
        more = f"\n  ... and {more} more distinct problems" if more > 0 else ""
        n_rows = len(self.by_line)
        header = (
            f"{self.count} problem{'s' if self.count > 1 else ''} in {n_rows} "
            f"row{'s' if n_rows > 1 else ''}; fix them and rerun:"
        )
        err = DataError(f"{header}\n{listed}{more}", self.source)
        err.line, err.field = shown[0].line, shown[0].field
        err.errors, err.count = shown, self.count
        raise err


def encoding_problems(value: Any, where: str) -> list[tuple[str, str]]:
    """``(field, reason)`` for every string in ``value`` (a string, or lists and messages holding them)
    that UTF-8 cannot encode: a lone surrogate such as ``"\\ud800"``, which JSON's ``\\u`` escapes can
    write (half of a UTF-16 pair, e.g. text cut between the two) and which no tokenizer can read."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return [
                (
                    where,
                    f"character {e.start} is {value[e.start]!r}, a lone UTF-16 surrogate, not text (expected "
                    "valid Unicode: was the text cut between the two halves of a surrogate pair?)",
                )
            ]
    elif isinstance(value, list):
        return [p for i, v in enumerate(value) for p in encoding_problems(v, f"{where}[{i}]")]
    elif isinstance(value, dict):
        return [p for k, v in value.items() for p in encoding_problems(v, f"{where}.{k}")]
    return []


def read_records(
    source: str, split: str | None = None, problems: Problems | None = None
) -> list[tuple[int, dict]]:
    """``(line, record)`` pairs from a ``.jsonl``/``.json``/``.parquet`` file or a Hugging Face dataset.

    JSONL: ``line`` is the file line (blank lines skipped). A ``.json`` file holding an array: the
    1-based element number; any other ``.json`` is read as JSON lines. Parquet and datasets: the
    1-based row number. A directory written by ``save_to_disk`` is read with ``load_from_disk``;
    any other directory or a name that is not a local path goes to ``datasets.load_dataset(source,
    split=split or "train")``. ``split`` only applies to datasets: a file is one split, so it is
    not consulted for files (configs carry a default split for both).
    Raises DataError for a missing or unreadable file and, listing them all, for invalid JSON lines;
    given `problems`, those lines are added to it instead (and left out), so that the caller reports them
    with the other rows' problems, in one pass.
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
            return _read_json_array(text, source, problems)
        if text.strip().count("\n") and _is_one_object(text):
            # A pretty-printed object would otherwise be reported line by line as invalid JSON.
            raise DataError(
                "the file is one JSON object (expected a JSON array of row objects, or one object per line)",
                source,
            )
    return _read_jsonl(path, source, problems)


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:  # JSON lines fail fast here, with "Extra data" after the first row
        return False


def _read_jsonl(path: Path, source: str, collect: Problems | None = None) -> list[tuple[int, dict]]:
    records, problems = [], collect if collect is not None else Problems(source)
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
                problems.add(n, None, f"{_json_error(e)} (expected one JSON object per line)")
                continue
            if isinstance(record, dict):
                records.append((n, record))
            else:
                problems.add(n, None, f"found a JSON {json_type(record)} (expected one JSON object per line)")
    if collect is None:
        problems.raise_if_any()
    return records


def _json_error(e: json.JSONDecodeError) -> str:
    """'invalid JSON: <why> at column N', without json's own trailing 'at' ('... starting at')."""
    return f"invalid JSON: {e.msg.removesuffix(' at')} at column {e.colno}"


def _read_json_array(text: str, source: str, collect: Problems | None = None) -> list[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(_json_error(e), source, e.lineno) from None
    problems = collect if collect is not None else Problems(source)
    for n, record in enumerate(data, 1):
        if not isinstance(record, dict):
            problems.add(n, None, f"found a JSON {json_type(record)} (expected an array of JSON objects)")
    if collect is None:
        problems.raise_if_any()
    return [(n, r) for n, r in enumerate(data, 1) if isinstance(r, dict)]


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
