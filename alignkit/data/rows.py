"""Validating rows (read by alignkit.data.readers) before training starts.

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
DPO; rows without one get 0), ``chosen_flagged`` / ``rejected_flagged`` (booleans: the response is
unsafe, for a ``flagged_reward`` constraint; absent = not flagged) and pre-tokenised ``prompt_ids``,
``chosen_ids``, ``rejected_ids`` (all three or none).

SFT rows: ``{"prompt": str, "completion": str}``; ``{"messages": [...]}`` whose last message is the
assistant's reply (the completion; everything before it is the prompt); or
``{"prompt": [messages], "completion": message | [message]}``.

Unpaired rows (KTO): an SFT row plus ``"label": true`` (a desirable completion) or ``false``.

Logged rows (offline RL): ``{"prompt": str | [messages], "response": str | assistant message, "reward":
number}``, the reward a finite number (a logged score of that response).

Listwise rows: ``{"prompt": str | [messages], "responses": [str | assistant message, ...]}`` (two or
more) with exactly one of ``scores`` (a finite number per response, higher is better), ``probs`` (a
target probability per response, summing to 1) or ``ranking`` (the response indices, best first:
``[2, 0, 1]`` says responses[2] is best).

Conversational rows of every format get the command's ``system_prompt`` (a system message put first in a
conversation without one; a row's own wins) and ``chat_template_kwargs`` (variables for the chat template,
e.g. Qwen3's ``enable_thinking``) in every rendering, as the online commands' prompt rows do
(``alignkit.data.prompts``); the parsers take them as ``template``, a dict of those two keys, empty when
neither is set. Either set for a source with no conversational row, or ``chat_template_kwargs`` for a
tokenizer with no chat template, is a ConfigError: they would do nothing.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from alignkit.config.load import ConfigError
from alignkit.data.chat import Issues, conversation_texts, json_type, render_messages, split_hh
from alignkit.data.readers import DataError, DroppedRow, Problems, encoding_problems, read_records

__all__ = [
    "DataError",
    "DroppedRow",
    "PreferenceData",
    "PreferenceRow",
    "ListwiseRow",
    "SFTRow",
    "UnpairedRow",
    "LoggedRow",
    "load_logged_rows",
    "load_listwise_rows",
    "load_preference_rows",
    "load_sft_rows",
    "load_unpaired_rows",
    "read_records",
    "render_messages",
    "split_hh",
]

ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")

PREFERENCE_FORMATS = (
    "{prompt: string, chosen: string, rejected: string}; "
    "{prompt: [messages], chosen: assistant message, rejected: assistant message}; "
    "or Anthropic HH {chosen: transcript, rejected: transcript}"
)
SFT_FORMATS = (
    "{prompt: string, completion: string}; {messages: [..., assistant message]}; "
    "or {prompt: [messages], completion: assistant message}"
)
UNPAIRED_FORMATS = SFT_FORMATS.replace("}", ", label: true/false}")
LISTWISE_FORMATS = (
    "{prompt: string, responses: [string, ...], scores | probs | ranking: [...]}; "
    "or {prompt: [messages], responses: [assistant message, ...], scores | probs | ranking: [...]}"
)
LIST_TARGETS = ("scores", "probs", "ranking")
# The fields of every row format (prompt rows' too) that hold text, checked for text UTF-8 can encode.
TEXT_KEYS = ("prompt", "messages", "chosen", "rejected", "completion", "response", "responses")


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
    chosen_flagged: bool | None = None
    rejected_flagged: bool | None = None


@dataclass
class SFTRow:
    """One validated supervised example: the loss is taken on ``completion`` only."""

    prompt: str
    completion: str
    source: str = ""
    line: int = 0


@dataclass
class UnpairedRow(SFTRow):
    """One validated unpaired example (KTO): a completion labelled desirable (True) or undesirable."""

    label: bool = True


@dataclass
class LoggedRow(SFTRow):
    """One validated logged example (offline RL): a response and the reward it was given."""

    reward: float = 0.0


@dataclass
class ListwiseRow:
    """One validated list: a prompt, two or more responses, and exactly one of scores, probs or ranking."""

    prompt: str
    responses: list[str]
    scores: list[float] | None = None
    probs: list[float] | None = None
    ranking: list[int] | None = None
    source: str = ""
    line: int = 0


@dataclass
class PreferenceData:
    """Validated preference rows, plus a DroppedRow (``str()``: "file:line: reason") per HH row that did
    not split."""

    rows: list[PreferenceRow]
    dropped: list[DroppedRow] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# validating one record; each helper appends (field, reason) to `issues` and returns None on error


def _parse_checked(parse, record: dict, tokenizer: Any, issues: Issues, *, template: dict):
    """``parse(record, tokenizer, issues, template=template)``, and None with a problem per text field
    (TEXT_KEYS) holding text that UTF-8 cannot encode."""
    bad = [p for key in TEXT_KEYS if key in record for p in encoding_problems(record[key], key)]
    row = parse(record, tokenizer, issues, template=template)
    issues.extend(bad)
    return None if bad else row


def _text(record: dict, key: str, issues: Issues, expected: str, *, completion: bool) -> str | None:
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


def preference_field(record: dict, issues: Issues) -> float | None:
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


def margin_field(record: dict, issues: Issues) -> float | None:
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


def _flag(record: dict, key: str, issues: Issues) -> bool | None:
    value = record.get(key)
    if value is None or isinstance(value, bool):
        return value
    issues.append((key, f"found {json_type(value)} (expected true or false)"))
    return None


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


def _preference_row(
    record: dict, tokenizer: Any, issues: Issues, *, template: dict
) -> PreferenceRow | str | None:
    """A row; or, for an HH row that does not split, the reason as a string; or None with issues."""
    n_issues = len(issues)
    preference = preference_field(record, issues)
    margin = margin_field(record, issues)
    flags = {k: _flag(record, k, issues) for k in ("chosen_flagged", "rejected_flagged")}
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
        texts = conversation_texts(tokenizer, prompt, replies, issues, **template)
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
    return PreferenceRow(*texts, preference=preference, margin=margin, **flags, **ids)


def _sft_row(
    record: dict, tokenizer: Any, issues: Issues, *, template: dict, formats: str = SFT_FORMATS
) -> SFTRow | None:
    """A row, or None with the problems appended to ``issues`` (``formats`` names the accepted ones)."""
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
            texts = conversation_texts(
                tokenizer, messages[:last], reply, issues, prompt_field="messages", **template
            )
    elif isinstance(prompt, str):
        completion = _text(record, "completion", issues, "a string, as 'prompt' is a string", completion=True)
        texts = (prompt, completion)
    elif isinstance(prompt, list):
        replies = [("completion", record.get("completion"))]
        texts = conversation_texts(tokenizer, prompt, replies, issues, **template)
    elif prompt is not None:
        issues.append(("prompt", f"found {json_type(prompt)} (expected a string or a list of messages)"))
    elif record.get("completion") is not None:
        issues.append(("prompt", "missing (expected a string or a list of messages)"))
    else:
        issues.append((None, f"unknown row format: found keys {sorted(record)} (expected {formats})"))
    if len(issues) > n_issues:
        return None
    return SFTRow(*texts)


def _unpaired_row(record: dict, tokenizer: Any, issues: Issues, *, template: dict) -> UnpairedRow | None:
    """An SFT row with a boolean ``label``, or None with the problems appended to ``issues``."""
    label = record.get("label")
    expected = "expected true for a desirable completion, false for an undesirable one"
    if label is None:
        issues.append(("label", f"missing ({expected})"))
    elif not isinstance(label, bool):
        issues.append(("label", f"found {json_type(label)} {label!r} ({expected})"))
    row = _sft_row(record, tokenizer, issues, template=template, formats=UNPAIRED_FORMATS)
    if row is None or not isinstance(label, bool):
        return None
    return UnpairedRow(row.prompt, row.completion, label=label)


def _logged_row(record: dict, tokenizer: Any, issues: Issues, *, template: dict) -> LoggedRow | None:
    """A {prompt, response, reward} row, or None with the problems appended to ``issues``."""
    n_issues = len(issues)
    reward, prompt = record.get("reward"), record.get("prompt")
    if not _is_number(reward):
        found = "missing" if reward is None else f"found {json_type(reward)} {reward!r}"
        issues.append(("reward", f"{found} (expected a finite number)"))
    texts = None
    if isinstance(prompt, str):
        response = _text(record, "response", issues, "a string, as 'prompt' is a string", completion=True)
        texts = (prompt, response)
    elif isinstance(prompt, list):
        replies = [("response", record.get("response"))]
        texts = conversation_texts(tokenizer, prompt, replies, issues, **template)
    else:
        found = "missing" if prompt is None else f"found {json_type(prompt)}"
        issues.append(("prompt", f"{found} (expected a string or a list of messages)"))
    if len(issues) > n_issues:
        return None
    return LoggedRow(*texts, reward=float(reward))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _list_target(record: dict, n: int | None, issues: Issues) -> dict[str, list]:
    """The row's one target: {'scores': [...]}, {'probs': [...]} or {'ranking': [...]}; {} with issues."""
    given = [k for k in LIST_TARGETS if record.get(k) is not None]
    if len(given) != 1:
        found = f"found {' and '.join(given)}" if given else "found none"
        issues.append(
            (given[1] if given else None, f"{found} (expected exactly one of {', '.join(LIST_TARGETS)})")
        )
        return {}
    key = given[0]
    value = record[key]
    expected = {
        "scores": "a finite number per response, higher is better",
        "probs": "a probability per response, summing to 1",
        "ranking": "the response indices best first, each once",
    }[key]
    if not isinstance(value, list):
        issues.append((key, f"found {json_type(value)} (expected a list: {expected})"))
    elif n is not None and len(value) != n:
        issues.append((key, f"{len(value)} values for {n} responses (expected {expected})"))
    elif key == "ranking":
        if sorted(v if isinstance(v, int) and not isinstance(v, bool) else -1 for v in value) != list(
            range(len(value))
        ):
            issues.append(
                (key, f"{value!r} is not a permutation of 0..{len(value) - 1} (expected {expected})")
            )
        else:
            return {key: list(value)}
    elif bad := [i for i, v in enumerate(value) if not _is_number(v) or (key == "probs" and v < 0)]:
        issues.append((key, f"element {bad[0]} is {value[bad[0]]!r} (expected {expected})"))
    elif key == "probs" and abs(sum(value) - 1.0) > 1e-3:
        issues.append((key, f"sums to {sum(value):.6g} (expected {expected})"))
    else:
        values = [float(v) for v in value]
        if key == "probs":  # remove rounding: the loss compares distributions
            values = [v / sum(values) for v in values]
        return {key: values}
    return {}


def _listwise_row(record: dict, tokenizer: Any, issues: Issues, *, template: dict) -> ListwiseRow | None:
    """A list row, or None with the problems appended to ``issues``."""
    n_issues = len(issues)
    prompt, responses = record.get("prompt"), record.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        found = f"{len(responses)} response(s)" if isinstance(responses, list) else json_type(responses)
        issues.append(("responses", f"found {found} (expected a list of at least two responses)"))
        responses = None
    target = _list_target(record, None if responses is None else len(responses), issues)
    texts = None
    if isinstance(prompt, str):
        for k, r in enumerate(responses or []):
            if not isinstance(r, str):
                issues.append(
                    (f"responses[{k}]", f"found {json_type(r)} (expected a string, as 'prompt' is one)")
                )
            elif not r.strip():
                issues.append((f"responses[{k}]", "empty completion (expected non-whitespace text)"))
        texts = [prompt, *(responses or [])]
    elif isinstance(prompt, list):
        if responses is not None:
            replies = [(f"responses[{k}]", r) for k, r in enumerate(responses)]
            texts = conversation_texts(tokenizer, prompt, replies, issues, **template)
    elif prompt is None and responses is None and not target:
        issues.append(
            (None, f"unknown row format: found keys {sorted(record)} (expected {LISTWISE_FORMATS})")
        )
    else:
        found = "missing" if prompt is None else f"found {json_type(prompt)}"
        issues.append(("prompt", f"{found} (expected a string or a list of messages)"))
    if len(issues) > n_issues:
        return None
    return ListwiseRow(texts[0], texts[1:], **target)


# ---------------------------------------------------------------------------------------------
# loading


def template_settings(
    tokenizer: Any, system_prompt: str | None = None, chat_template_kwargs: dict | None = None
) -> dict:
    """The ``template`` the parsers take: {system_prompt, chat_template_kwargs} holding those set (see the
    module docstring). ``chat_template_kwargs`` for a tokenizer (or processor) with no chat template is a
    ConfigError: there is no template to pass them to."""
    if chat_template_kwargs and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"chat_template_kwargs {chat_template_kwargs} is set, but the tokenizer has no chat template to "
            "pass them to; remove it, or use a tokenizer with a chat template"
        )
    template = {"system_prompt": system_prompt, "chat_template_kwargs": chat_template_kwargs or None}
    return {k: v for k, v in template.items() if v is not None}


def check_template_used(source: str, template: dict, conversational: bool) -> None:
    """ConfigError naming each template setting given when `source` has no conversational row (every row
    is text, which no chat template renders): the setting would do nothing."""
    if not template or conversational:
        return
    names = " and ".join(template)
    is_, it, applies = ("is", "it", "applies") if len(template) == 1 else ("are", "them", "apply")
    raise ConfigError(
        f"{names} {is_} set, but {source} has only text rows: {names} {applies} to conversational rows "
        f"(prompts given as messages, rendered by the chat template); remove {it}, or give the rows as messages"
    )


def is_conversational(record: dict) -> bool:
    """Whether a row's prompt is given as messages (rendered with the chat template), in any format."""
    return isinstance(record.get("prompt"), list) or isinstance(record.get("messages"), list)


def load_preference_rows(
    source: str,
    split: str | None = None,
    tokenizer: Any = None,
    skipped: list[DroppedRow] | None = None,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> PreferenceData:
    """Read and validate preference rows from ``source`` (see :func:`read_records`).

    Conversational rows are rendered with ``tokenizer``'s chat template, or the plain default when
    it has none or is None, given ``system_prompt`` and ``chat_template_kwargs`` (see the module
    docstring). HH rows that do not split are dropped and listed in ``dropped``; every
    other problem is collected over the whole source and raised as one DataError, as is a source
    with no usable rows. Given a ``skipped`` list (on_bad_rows=skip), bad rows are left out and each is
    appended to it instead.
    """
    dropped: list[DroppedRow] = []
    settings = {"system_prompt": system_prompt, "chat_template_kwargs": chat_template_kwargs}
    rows = load_row_file(
        source,
        split,
        tokenizer,
        _preference_row,
        kind="preference",
        skipped=skipped,
        dropped=dropped,
        **settings,
    )
    return PreferenceData(rows, dropped)


def raise_or_skip(problems: Problems, skipped: list[DroppedRow] | None) -> None:
    """Raise every problem at once; or, given a `skipped` list, record the bad rows there (the whole
    source's problems, such as an unreadable file, are still raised)."""
    problems.raise_if_any(skip=skipped is not None)
    if skipped is not None:
        skipped.extend(problems.dropped())


def load_row_file(
    source: str,
    split: str | None,
    tokenizer: Any,
    parse,
    *,
    kind: str,
    skipped: list[DroppedRow] | None = None,
    dropped: list[DroppedRow] | None = None,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list:
    """Rows of ``source`` parsed by ``parse(record, tokenizer, issues, template=...)``, the template settings
    checked (see the module docstring); every problem collected and raised as one DataError (or, given
    ``skipped``, the bad rows left out and appended to it), as is an empty source. Given ``dropped``,
    ``parse`` may return a string instead of a row: the row is dropped for that reason (an HH row that
    does not split) and listed there."""
    template = template_settings(tokenizer, system_prompt, chat_template_kwargs)
    problems, rows, conversational = Problems(source), [], False
    records = read_records(source, split, problems)
    for line, record in records:
        issues: Issues = []
        row = _parse_checked(parse, record, tokenizer, issues, template=template)
        for key, reason in issues:
            problems.add(line, key, reason)
        if isinstance(row, str) and dropped is not None:
            dropped.append(DroppedRow(source, line, row))
        elif row is not None:
            row.source, row.line = source, line
            rows.append(row)
            conversational = conversational or is_conversational(record)
    raise_or_skip(problems, skipped)
    if not rows:
        if dropped is not None:
            why = (
                f"all {len(dropped)} rows were dropped, e.g. {dropped[0]}"
                if dropped
                else "the source is empty"
            )
        else:
            why = f"all {len(problems.lines)} rows are bad" if problems.count else "the source is empty"
        raise DataError(f"no usable {kind} rows ({why})", source)
    check_template_used(source, template, conversational)
    return rows


def load_sft_rows(
    source: str,
    split: str | None = None,
    tokenizer: Any = None,
    skipped: list[DroppedRow] | None = None,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[SFTRow]:
    """Read and validate SFT rows from ``source`` (see :func:`read_records`).

    For ``messages`` rows only the final assistant reply is the completion; earlier turns (assistant
    ones included) are prompt. All problems are collected and raised as one DataError, as is an
    empty source; given ``skipped`` (on_bad_rows=skip), bad rows are left out and appended to it.
    Conversations get ``system_prompt`` and ``chat_template_kwargs`` (see the module docstring).
    """
    return load_row_file(
        source,
        split,
        tokenizer,
        _sft_row,
        kind="SFT",
        skipped=skipped,
        system_prompt=system_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )


def load_unpaired_rows(
    source: str,
    split: str | None = None,
    tokenizer: Any = None,
    skipped: list[DroppedRow] | None = None,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[UnpairedRow]:
    """Read and validate unpaired (KTO) rows: any SFT format plus a boolean ``label``. All problems are
    collected and raised as one DataError, as is an empty source. Conversations get ``system_prompt`` and
    ``chat_template_kwargs`` (see the module docstring)."""
    return load_row_file(
        source,
        split,
        tokenizer,
        _unpaired_row,
        kind="unpaired",
        skipped=skipped,
        system_prompt=system_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )


def load_logged_rows(
    source: str,
    split: str | None = None,
    tokenizer: Any = None,
    skipped: list[DroppedRow] | None = None,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[LoggedRow]:
    """Read and validate logged {prompt, response, reward} rows (offline RL). All problems are collected
    and raised as one DataError, as is an empty source. Conversations get ``system_prompt`` and
    ``chat_template_kwargs`` (see the module docstring)."""
    return load_row_file(
        source,
        split,
        tokenizer,
        _logged_row,
        kind="logged",
        skipped=skipped,
        system_prompt=system_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )


def load_listwise_rows(
    source: str,
    split: str | None = None,
    tokenizer: Any = None,
    skipped: list[DroppedRow] | None = None,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[ListwiseRow]:
    """Read and validate list rows (see the module docstring). All problems are collected and raised as
    one DataError, as is an empty source. Conversations get ``system_prompt`` and ``chat_template_kwargs``
    (see the module docstring)."""
    return load_row_file(
        source,
        split,
        tokenizer,
        _listwise_row,
        kind="listwise",
        skipped=skipped,
        system_prompt=system_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )
