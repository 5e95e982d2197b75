"""Validating one record into a row (``alignkit.data.rows``), one parser per format.

Each parser appends a (field, reason) per problem to ``issues`` and returns None on error, so that the
caller (``alignkit.data.load``) can collect every problem of a file, naming ``file:line``, the field, what
was wrong and what was expected.

Preference rows (format detected per row; extra keys are ignored):

1. text: ``{"prompt": str, "chosen": str, "rejected": str}``
2. conversational: ``{"prompt": [messages], "chosen": message | [message], "rejected": ...}``; the
   replies are single assistant messages, rendered with :func:`alignkit.data.chat.render_messages`
3. Anthropic HH: ``{"chosen": transcript, "rejected": transcript}`` (no ``prompt``), split with
   :func:`alignkit.data.chat.split_hh`; rows that do not split are dropped and listed in
   ``PreferenceData.dropped``

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

The parsers take the chat template settings as ``template`` (``alignkit.data.load.template_settings``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from alignkit.data.chat import Issues, conversation_texts, json_type, split_hh
from alignkit.data.rows import ListwiseRow, LoggedRow, PreferenceRow, SFTRow, UnpairedRow

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


def preference_row(
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


def sft_row(
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


def unpaired_row(record: dict, tokenizer: Any, issues: Issues, *, template: dict) -> UnpairedRow | None:
    """An SFT row with a boolean ``label``, or None with the problems appended to ``issues``."""
    label = record.get("label")
    expected = "expected true for a desirable completion, false for an undesirable one"
    if label is None:
        issues.append(("label", f"missing ({expected})"))
    elif not isinstance(label, bool):
        issues.append(("label", f"found {json_type(label)} {label!r} ({expected})"))
    row = sft_row(record, tokenizer, issues, template=template, formats=UNPAIRED_FORMATS)
    if row is None or not isinstance(label, bool):
        return None
    return UnpairedRow(row.prompt, row.completion, label=label)


def logged_row(record: dict, tokenizer: Any, issues: Issues, *, template: dict) -> LoggedRow | None:
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


def listwise_row(record: dict, tokenizer: Any, issues: Issues, *, template: dict) -> ListwiseRow | None:
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
