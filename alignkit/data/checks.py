"""Warnings about rows that are valid but probably not what the user meant: exact duplicates, empty
responses, and text the tokenizer mostly cannot represent (e.g. a script the model never saw).

Each check is a pure function of rows (or texts) returning readable lines, `file:line` first; the caller
logs them. None of them refuses a row: the data may be meant that way.
"""

from __future__ import annotations

import dataclasses
import json

TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected", "responses")
LOST_TEXT = 0.5  # a row is flagged when more than this share of its characters do not survive tokenisation


def _where(row) -> str:
    return f"{row.source}:{row.line}"


def _content(row) -> str:
    """The row's content without where it came from, as a key for finding duplicates."""
    fields = {k: v for k, v in dataclasses.asdict(row).items() if k not in ("source", "line")}
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def duplicate_rows(rows: list) -> list[str]:
    """One line saying how many rows repeat an earlier one exactly (with examples), or none."""
    first: dict[str, object] = {}
    repeats = []
    for row in rows:
        key = _content(row)
        if key in first:
            repeats.append(f"{_where(row)} repeats {_where(first[key])}")
        else:
            first[key] = row
    if not repeats:
        return []
    shown = "; ".join(repeats[:5]) + ("; ..." if len(repeats) > 5 else "")
    return [
        f"warning: {len(repeats)} rows repeat an earlier row exactly ({shown}); each copy is trained on, "
        "which weights it more: remove the copies unless that is meant"
    ]


def lost_share(text: str, tokenizer) -> float:
    """Share of `text`'s non-space characters that tokenising loses: dropped, or turned into the unknown
    token (0 for a byte-level tokenizer, which represents any text)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    kept = [i for i in ids if unk is None or i != unk]
    decoded = tokenizer.decode(kept, skip_special_tokens=True)
    survived = sum(1 for c in decoded if not c.isspace())
    return max(0.0, 1.0 - survived / len(chars))


def unknown_text_rows(rows: list, tokenizer) -> list[str]:
    """One line naming the rows most of whose text the tokenizer cannot represent, or none."""
    flagged = []
    for row in rows:
        texts = []
        for name in TEXT_FIELDS:
            value = getattr(row, name, None)
            texts += value if isinstance(value, list) else [value] if isinstance(value, str) else []
        share = lost_share(" ".join(texts), tokenizer)
        if share > LOST_TEXT:
            flagged.append(f"{_where(row)} ({share:.0%} lost)")
    if not flagged:
        return []
    shown = ", ".join(flagged[:5]) + (", ..." if len(flagged) > 5 else "")
    return [
        f"warning: {len(flagged)} rows are mostly text this tokenizer cannot represent ({shown}): the model "
        "sees little of them; is the text in a language or script the model was not trained on?"
    ]
