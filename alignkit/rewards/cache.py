"""A SQLite cache of judge answers, so that a rerun costs nothing and gives the same scores.

Keyed by (judge identity, template, prompt, response): the identity names the backend, endpoint,
model and decoding settings (never the API key), so changing any of them asks again. The raw answer
and the parsed score (NULL when it could not be parsed: the fallback is applied when read, so
changing `fallback` needs no new requests) are stored.

Every `put` is its own committed transaction, so a run that crashes keeps every answer it had
received. The database is in WAL mode with a busy timeout, so several runs or processes can read
and write it at once (SQLite serialises the writers).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    template TEXT NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    answer TEXT NOT NULL,
    score REAL,
    created REAL NOT NULL
)
"""


def cache_key(judge: str, template: str, prompt: str, response: str) -> str:
    """SHA-256 of the four parts, unambiguously joined (a JSON list)."""
    text = json.dumps([judge, template, prompt, response], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge answers in a SQLite file (see the module docstring). Use from one thread at a time."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; `put` opens and commits its own.
        self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable against a crash of the process (not of the OS) in WAL mode, and fast.
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute(SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, tuple[str, float | None]]:
        """key -> (answer, score or None) for the keys present."""
        found: dict[str, tuple[str, float | None]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite limits the number of bound parameters
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT key, answer, score FROM judgements WHERE key IN ({marks})", chunk
            ).fetchall()
            found.update({k: (a, s) for k, a, s in rows})
        return found

    def put(
        self,
        key: str,
        judge: str,
        template: str,
        prompt: str,
        *,
        response: str,
        answer: str,
        score: float | None,
    ) -> None:
        """Stores one answer and commits it."""
        with self.conn:  # BEGIN ... COMMIT (ROLLBACK on error)
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, judge, template, prompt, response, answer, score, time.time()),
            )

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"
