"""Reading raw records from files and datasets, and the error type that names file:line:field.

`read_records` turns a .jsonl/.json/.parquet file, a saved dataset folder or a Hugging Face dataset name
into (line, record) pairs; `DataError` and `Problems` collect every problem of a file into one error.
Validation of the records' fields lives in alignkit.data.rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.data.chat import json_type

MAX_REPORTED = 20  # problems listed in one DataError; the total count is always given
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


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


class Problems:
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
    records, problems = [], Problems(source)
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
    problems = Problems(source)
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
