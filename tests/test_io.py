"""alignkit.io: atomic writes, the torn-last-line rule for JSON lines, the umask."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from alignkit.io import append_jsonl, atomic_path, atomic_write, cut_torn_line, follow_umask, read_jsonl


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path, umask_022):
    path = tmp_path / "sub" / "report.json"
    atomic_write(path, "old\n")
    atomic_write(path, b"new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "kept")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_safetensors_through_atomic_path_follows_the_umask(tmp_path, umask_022):
    """safetensors creates its file 0600; written through atomic_path it gets 0644 like every other file."""
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    assert bare.stat().st_mode & 0o777 == 0o600  # the behaviour being corrected
    path = tmp_path / "ref.safetensors"
    with atomic_path(path) as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert path.stat().st_mode & 0o777 == 0o644
    follow_umask(bare)
    assert bare.stat().st_mode & 0o777 == 0o644


def test_read_jsonl_torn_last_line_bad_lines_and_cut(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n[1, 2]\nnot json\n\n{"step": 2}\n{"step": 3, "lo')
    found = read_jsonl(path)
    assert found.records == [{"step": 1}, {"step": 2}]
    assert found.lines == [1, 5]
    assert found.bad == [(2, "a JSON list, not an object"), (3, "not JSON")]
    assert found.torn
    assert cut_torn_line(path, found)
    assert path.read_bytes().endswith(b'{"step": 2}\n')
    again = read_jsonl(path)
    assert not again.torn and again.records == found.records
    assert not cut_torn_line(path, again)


def test_a_last_line_without_its_newline_is_torn_even_when_it_parses(tmp_path):
    """Appending after it would glue two records into one line, so it is cut like any torn line."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}')
    found = read_jsonl(path)
    assert found.records == [{"index": 0}] and found.torn
    cut_torn_line(path, found)
    with open(path, "a") as f:
        append_jsonl(f, {"index": 1, "text": "é"}, durable=True)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"index": 0},
        {"index": 1, "text": "é"},
    ]


def test_missing_file_reads_empty(tmp_path):
    found = read_jsonl(tmp_path / "none.jsonl")
    assert found.records == [] and not found.torn and found.bad == []
