"""Chat messages: validating them and rendering them to text.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts. It is rendered with the
tokenizer's own chat template when it has one, and otherwise with :data:`PLAIN_TURN_PREFIXES`, a
plain default chosen to match the Anthropic HH transcript format, so that a conversational row and
the equivalent HH transcript train on exactly the same text::

    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ->  "\\n\\nHuman: Hi\\n\\nAssistant: Hello!"

Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) are split by :func:`split_hh`.

The functions here know nothing about files: they report ``(field, reason)`` pairs or raise
``ValueError`` with a reason, and the caller (``alignkit.data.parse`` / ``load``) adds the file and line.
"""

from __future__ import annotations

import os
from typing import Any

# Roles a message may have. A closed set catches the common mistakes (ShareGPT's "human"/"gpt",
# a "bot" role) before training rather than letting a template silently render them oddly.
ROLES = ("system", "developer", "user", "assistant", "tool")

# The plain default template: each turn is "\n\n" + prefix + " " + content, and the generation
# prompt is "\n\nAssistant:". So a completion rendered after the prompt starts with a space, exactly
# as the reply does in an HH transcript. There is no end-of-turn marker: the tokenising step appends
# the tokenizer's EOS to completions.
PLAIN_TURN_PREFIXES = {
    "system": "System:",
    "developer": "System:",
    "user": "Human:",
    "assistant": "Assistant:",
    "tool": "Tool:",
}
PLAIN_GENERATION_PROMPT = "\n\nAssistant:"
HH_ASSISTANT = "\n\nAssistant:"  # an HH transcript's prompt ends at the last one

REPLY_EXPECTED = "an assistant message or a list holding one assistant message"

# (field, reason) pairs: what validation reports; the caller adds the source and line.
Issues = list[tuple[str | None, str]]


def message_problems(message: Any, where: str) -> list[tuple[str, str]]:
    """Problems with one message, as ``(field, reason)`` pairs; empty when it is valid.

    ``where`` names the message in the row (``"prompt[2]"``, ``"chosen"``) and prefixes the field.
    Extra keys (``name``, ``tool_calls``, ...) are allowed and passed to the chat template.
    """
    if not isinstance(message, dict):
        return [(where, f"found {json_type(message)} (expected a message object with 'role' and 'content')")]
    problems = []
    role = message.get("role")
    if role is None:
        problems.append((f"{where}.role", f"missing (expected one of {_quoted(ROLES)})"))
    elif role not in ROLES:
        found = repr(role) if isinstance(role, str) else json_type(role)
        problems.append((f"{where}.role", f"{found} is not a known role (expected one of {_quoted(ROLES)})"))
    content = message.get("content")
    if content is None:
        problems.append((f"{where}.content", "missing (expected a string)"))
    elif not isinstance(content, str):
        problems.append((f"{where}.content", f"found {json_type(content)} (expected a string)"))
    return problems


def messages_problems(messages: Any, where: str) -> list[tuple[str, str]]:
    """Problems with a non-empty list of messages, as ``(field, reason)`` pairs."""
    if not isinstance(messages, list):
        return [(where, f"found {json_type(messages)} (expected a list of messages)")]
    if not messages:
        return [(where, "empty list (expected at least one message)")]
    problems = []
    for i, message in enumerate(messages):
        problems += message_problems(message, f"{where}[{i}]")
    return problems


def render_messages(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool, *, template_kwargs: dict | None = None
) -> str:
    """Render ``messages`` to text.

    Uses ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` when the tokenizer has a
    ``chat_template``, with ``template_kwargs`` as extra template variables (e.g. Qwen3's
    ``enable_thinking``); otherwise (including ``tokenizer=None``) the plain default described in the
    module docstring. ``add_generation_prompt=True`` appends the assistant-turn opener so the text
    ends where the model's reply begins.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
        )
        if not isinstance(text, str):  # a template returning a batch/list would be a caller bug
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    parts = []
    for message in messages:
        prefix = PLAIN_TURN_PREFIXES.get(message["role"], message["role"].capitalize() + ":")
        parts.append(f"\n\n{prefix} {message['content']}")
    if add_generation_prompt:
        parts.append(PLAIN_GENERATION_PROMPT)
    return "".join(parts)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` with a system message holding `system_prompt` first, unless it is None or the
    conversation has a system message of its own (a row's own instruction wins over the setting). Its
    content takes the shape of the conversation's: a list of one text part where the first message's
    content is a list of parts (vision rows), else the string."""
    if system_prompt is None or any(m["role"] in ("system", "developer") for m in messages):
        return list(messages)
    parts = bool(messages) and isinstance(messages[0].get("content"), list)
    content = [{"type": "text", "text": system_prompt}] if parts else system_prompt
    return [{"role": "system", "content": content}, *messages]


def render_prompt_and_completion(
    tokenizer: Any,
    prompt: list[dict],
    reply: dict,
    prompt_text: str | None = None,
    *,
    template_kwargs: dict | None = None,
) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` for a prompt conversation and one assistant reply.

    ``prompt_text`` is the prompt rendered with the generation prompt; ``completion_text`` is the
    whole conversation rendered without it, minus ``prompt_text`` at its front. Training on
    ``prompt_text + completion_text`` therefore sees exactly the text the template produces for the
    full conversation, and generation from ``prompt_text`` starts where the reply starts. Both
    renderings get ``template_kwargs`` (see :func:`render_messages`).

    Pass ``prompt_text`` when it is already rendered (two replies to one prompt) to render it once.
    Raises ``ValueError`` when the full rendering does not begin with ``prompt_text`` (some templates,
    e.g. ones that strip earlier reasoning, rewrite the prompt once a reply follows).
    """
    if prompt_text is None:
        prompt_text = render_messages(
            tokenizer, prompt, add_generation_prompt=True, template_kwargs=template_kwargs
        )
    full_text = render_messages(
        tokenizer, [*prompt, reply], add_generation_prompt=False, template_kwargs=template_kwargs
    )
    if not full_text.startswith(prompt_text):
        at = len(os.path.commonprefix([prompt_text, full_text]))
        raise ValueError(
            "the chat template does not extend the prompt: the rendered conversation does not start "
            f"with the rendered prompt (they differ at character {at}: prompt has "
            f"{prompt_text[at : at + 30]!r}, conversation has {full_text[at : at + 30]!r}); use a chat "
            "template whose output for a conversation begins with its output for the prompt with "
            "add_generation_prompt=True"
        )
    return prompt_text, full_text[len(prompt_text) :]


def reply_message(value: Any, key: str, issues: Issues) -> dict | None:
    """The assistant reply held in ``value`` (a message, or a list of exactly one), or None with issues."""
    where = key
    if value is None:
        issues.append((key, f"missing (expected {REPLY_EXPECTED})"))
        return None
    if isinstance(value, list):
        if len(value) != 1:
            issues.append((key, f"found a list of {len(value)} messages (expected {REPLY_EXPECTED})"))
            return None
        value, where = value[0], f"{key}[0]"
    elif not isinstance(value, dict):
        issues.append((key, f"found {json_type(value)} (expected {REPLY_EXPECTED})"))
        return None
    problems = message_problems(value, where)
    if not problems and value["role"] != "assistant":
        problems = [(f"{where}.role", f"{value['role']!r} (expected 'assistant', as this is the reply)")]
    elif not problems and not value["content"].strip():
        problems = [(key, "empty completion (expected non-whitespace text)")]
    issues.extend(problems)
    return None if problems else value


def conversation_texts(
    tokenizer: Any,
    prompt: Any,
    replies: list[tuple[str, Any]],
    issues: Issues,
    *,
    prompt_field: str = "prompt",
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[str] | None:
    """``[prompt_text, completion_text, ...]`` for a prompt conversation and its ``(field, reply)``s.

    Validates the prompt messages and each reply (see :func:`reply_message`) and renders them with
    :func:`render_prompt_and_completion`, the prompt given the command's ``system_prompt``
    (:func:`with_system_prompt`) and every rendering its ``chat_template_kwargs``; on any problem
    appends ``(field, reason)`` to ``issues`` and returns None.
    """
    n_issues = len(issues)
    issues.extend(messages_problems(prompt, prompt_field))
    messages = [reply_message(value, key, issues) for key, value in replies]
    if len(issues) > n_issues:
        return None
    prompt = with_system_prompt(prompt, system_prompt)
    prompt_text, completions = None, []
    for (key, _), message in zip(replies, messages):
        try:
            prompt_text, completion = render_prompt_and_completion(
                tokenizer, prompt, message, prompt_text, template_kwargs=chat_template_kwargs
            )
        except Exception as e:  # a template's own raise_exception(...), or one that does not extend
            issues.append((key, f"cannot render with the chat template: {e}"))
            return None
        completions.append(completion)
    return [prompt_text, *completions]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two Anthropic HH transcripts into ``(prompt, chosen_completion, rejected_completion)``.

    The prompt is everything up to and including the last ``"\\n\\nAssistant:"`` of each transcript;
    the completions keep their leading space, so ``prompt + completion`` is the original transcript.
    Raises ValueError with the reason when a transcript has no ``"\\n\\nAssistant:"``, the two prompts
    differ, or a completion is empty or whitespace.
    """
    parts = []
    for name, transcript in (("chosen", chosen), ("rejected", rejected)):
        cut = transcript.rfind(HH_ASSISTANT)
        if cut < 0:
            raise ValueError(f"the {name} transcript has no {HH_ASSISTANT!r} turn")
        cut += len(HH_ASSISTANT)
        parts.append((transcript[:cut], transcript[cut:]))
    (prompt, chosen_reply), (rejected_prompt, rejected_reply) = parts
    if prompt != rejected_prompt:
        at = len(os.path.commonprefix([prompt, rejected_prompt]))
        raise ValueError(
            f"the chosen and rejected transcripts differ at character {at}, before their last "
            "assistant reply (expected them to share every turn but the last)"
        )
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if not reply.strip():
            raise ValueError(f"the {name} transcript's last assistant reply is empty")
    return prompt, chosen_reply, rejected_reply


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages ("string", "number", "list", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(repr(n) for n in names)
