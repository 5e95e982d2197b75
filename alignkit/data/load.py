"""Reading a source into validated rows: every problem in a file is collected and reported at once, in
one :class:`DataError` whose message names ``file:line``, the field, what was wrong and what was expected,
so a user fixes a file in one pass rather than one crash per bad row. The formats are in
``alignkit.data.parse``.

Conversational rows of every format get the command's ``system_prompt`` (a system message put first in a
conversation without one; a row's own wins) and ``chat_template_kwargs`` (variables for the chat template,
e.g. Qwen3's ``enable_thinking``) in every rendering, as the online commands' prompt rows do
(``alignkit.data.prompts``); the parsers take them as ``template``, a dict of those two keys, empty when
neither is set. Either set for a source with no conversational row, or ``chat_template_kwargs`` for a
tokenizer with no chat template, is a ConfigError: they would do nothing.
"""

from __future__ import annotations

from typing import Any

from alignkit.config.load import ConfigError
from alignkit.data.chat import Issues
from alignkit.data.parse import listwise_row, logged_row, preference_row, sft_row, unpaired_row
from alignkit.data.readers import DataError, DroppedRow, Problems, encoding_problems, read_records
from alignkit.data.rows import ListwiseRow, LoggedRow, PreferenceData, SFTRow, UnpairedRow

# The fields of every row format (prompt rows' too) that hold text, checked for text UTF-8 can encode.
TEXT_KEYS = ("prompt", "messages", "chosen", "rejected", "completion", "response", "responses")


def _parse_checked(parse, record: dict, tokenizer: Any, issues: Issues, *, template: dict):
    """``parse(record, tokenizer, issues, template=template)``, and None with a problem per text field
    (TEXT_KEYS) holding text that UTF-8 cannot encode."""
    bad = [p for key in TEXT_KEYS if key in record for p in encoding_problems(record[key], key)]
    row = parse(record, tokenizer, issues, template=template)
    issues.extend(bad)
    return None if bad else row


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
        preference_row,
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
        sft_row,
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
        unpaired_row,
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
        logged_row,
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
    """Read and validate list rows (see ``alignkit.data.parse``). All problems are collected and raised as
    one DataError, as is an empty source. Conversations get ``system_prompt`` and ``chat_template_kwargs``
    (see the module docstring)."""
    return load_row_file(
        source,
        split,
        tokenizer,
        listwise_row,
        kind="listwise",
        skipped=skipped,
        system_prompt=system_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )
