"""Prompt rows for online methods (GRPO, RLOO, PPO) and evaluation: prompts the policy answers.

Accepted, per row (extra keys are ignored):

1. text: ``{"prompt": str}`` (non-empty)
2. conversational: ``{"prompt": [messages]}`` or ``{"messages": [messages]}``, rendered with the
   tokenizer's chat template and the generation prompt (the assistant-turn opener)

A ``.json`` file holding a list of strings (e.g. ``alignkit/assets/demo/heldout_openings.json``) is read
as text prompts. Every problem in a file is reported at once as ``file:line: field 'name': ...``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.chat import Issues, json_type, messages_problems, render_messages
from alignkit.data.readers import DataError, DroppedRow, Problems, encoding_problems
from alignkit.data.rows import _load_rows, _raise_or_skip

PROMPT_FORMATS = "{prompt: string}; {prompt: [messages]}; or {messages: [messages]}"


@dataclass
class PromptRow:
    """One prompt as the policy sees it (conversations rendered) and where it came from."""

    prompt: str
    source: str = ""
    line: int = 0


def _prompt_row(record: dict, tokenizer: Any, issues: Issues) -> PromptRow | None:
    n = len(issues)
    key = "messages" if "messages" in record and "prompt" not in record else "prompt"
    value = record.get(key)
    if "messages" in record and "prompt" in record:
        issues.append((None, "row has both 'messages' and 'prompt' (expected one prompt format per row)"))
    elif value is None:
        issues.append(
            ("prompt", f"missing (expected a string or a list of messages; found keys {sorted(record)})")
        )
    elif isinstance(value, str):
        if not value.strip():
            issues.append((key, "empty prompt (expected non-whitespace text)"))
    elif isinstance(value, list):
        issues.extend(messages_problems(value, key))
    else:
        issues.append((key, f"found {json_type(value)} (expected a string or a list of messages)"))
    if len(issues) > n:
        return None
    text = value if isinstance(value, str) else render_messages(tokenizer, value, add_generation_prompt=True)
    return PromptRow(text)


def load_prompt_rows(
    source: str, split: str | None = None, tokenizer: Any = None, skipped: list[DroppedRow] | None = None
) -> list[PromptRow]:
    """Read and validate prompt rows from ``source`` (a .jsonl/.json/.parquet file, a saved dataset or a
    hub dataset name; or a .json list of strings). All problems are raised as one DataError, as is an
    empty source; given ``skipped`` (on_bad_rows=skip), bad rows are left out and appended to it."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None  # read_records reports where
        if isinstance(data, list) and not any(isinstance(x, dict) for x in data):
            problems = Problems(source)
            for n, prompt in enumerate(data, 1):
                if not isinstance(prompt, str):
                    problems.add(n, None, f"found a JSON {json_type(prompt)} (expected a prompt string)")
                elif not prompt.strip():
                    problems.add(n, None, "empty prompt (expected non-whitespace text)")
                else:
                    for _, reason in encoding_problems(prompt, ""):
                        problems.add(n, None, reason)
            _raise_or_skip(problems, skipped)
            good = [PromptRow(p, source, n) for n, p in enumerate(data, 1) if n not in problems.lines]
            if not good:
                raise DataError("no prompts (the list is empty)" if not data else "no usable prompts", source)
            return good
    return _load_rows(source, split, tokenizer, _prompt_row, "prompt", skipped)
