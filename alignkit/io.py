"""Files written whole or not at all, JSON lines read with one rule for a torn last line, and the umask.

Every file alignkit writes that a reader (a resumed run, a report, a user) may open while the run is still
going is written through `atomic_write` / `atomic_path`: the content goes to a hidden temporary file beside
the target, which then replaces it in one rename, so a reader sees the old file or the new one, never half
of one. Every JSON-lines file is read through `read_jsonl`: a last line without its newline that does not
parse is the line a run was writing when it stopped (a torn line), which the caller may cut; any other bad
line is reported by number.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def current_umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(path: str | Path) -> None:
    """Give `path` (a file, or every file under a folder) the permissions of a file created under the process
    umask: safetensors and some other writers create theirs 0600, where everything else is 0666 & ~umask."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)


def temporary_name(path: str | Path) -> Path:
    """The hidden temporary file beside `path` that an atomic write of it goes through (one per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to (with any writer: safetensors, torch.save, open);
    on a normal exit it gets the umask's permissions and replaces `path` in one rename; on an exception it
    is removed and `path` is left as it was. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        follow_umask(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, content: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write `content` (text or bytes) to `path` whole or not at all (see `atomic_path`); returns `path`."""
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding=encoding)
    return Path(path)


def append_jsonl(f, record: dict, *, durable: bool = False) -> None:
    """Append one JSON object as one line to the open text file `f`; with `durable`, flushed and fsynced
    before returning (a line that must survive a kill, e.g. a scored candidate that cost minutes)."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if durable:
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """All `records`, one JSON object per line, or nothing (`atomic_write`)."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@dataclass
class JsonLines:
    """What `read_jsonl` found. records: the JSON objects of the whole lines, in order; lines: the line
    number of each; bad: (line number, why) of each other non-blank line; torn_line: the number of the last
    line when it was cut short (it has no newline: the writer stopped in it, since every line is written
    with its newline), else 0; whole_bytes: the length of the file without
    the torn line (what `cut_torn_line` truncates it to)."""

    path: Path
    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)
    torn_line: int = 0
    whole_bytes: int = 0

    @property
    def torn(self) -> bool:
        return self.torn_line > 0

    def skipped(self) -> list[str]:
        """One note per line left out, naming path:line (for a reader that shows rather than refuses)."""
        notes = [f"{self.path}:{number}: {why}, skipped" for number, why in self.bad]
        if self.torn:
            notes.append(
                f"{self.path}:{self.torn_line}: truncated last line skipped (the run was writing it)"
            )
        return notes


def read_jsonl(path: str | Path) -> JsonLines:
    """Read a JSON-lines file with the torn-last-line rule (see `JsonLines`). Never raises for the content;
    each caller decides what a bad line means to it. A missing file reads as empty."""
    path = Path(path)
    out = JsonLines(path)
    if not path.exists():
        return out
    data = path.read_bytes()
    start, number = 0, 0
    while start < len(data):
        number += 1
        end = data.find(b"\n", start)
        if end == -1:  # no newline after it: the writer stopped in this line (even if what it wrote parses)
            if data[start:].strip():
                out.torn_line = number
            break
        line = data[start:end]
        if line.strip():
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                out.bad.append((number, "not JSON"))
            else:
                if isinstance(record, dict):
                    out.records.append(record)
                    out.lines.append(number)
                else:
                    out.bad.append((number, f"a JSON {type(record).__name__}, not an object"))
        start = out.whole_bytes = end + 1
    return out


def cut_torn_line(path: str | Path, found: JsonLines) -> bool:
    """Truncate `path` to its whole lines when `found` (read from it) says the last one was torn; returns
    whether it did, so the caller can say so."""
    if not found.torn:
        return False
    with open(path, "r+b") as f:
        f.truncate(found.whole_bytes)
    return True
