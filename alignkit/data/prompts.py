"""Prompt rows, and the one prompt encoder of every command that samples from prompts: grpo, rloo, ppo,
online-dpo, iterative-dpo, distill, generate (and its ICDPO scoring), eval and the local LLM judge.

Accepted, per row (every other key is one of the row's columns, `PromptRow.columns`, which the reward
sources may read, e.g. a math problem's `answer`):

1. text: ``{"prompt": str}`` (non-empty)
2. conversational: ``{"prompt": [messages]}`` or ``{"messages": [messages]}``, rendered with the
   tokenizer's chat template and the generation prompt (the assistant-turn opener); the command's
   ``system_prompt`` is put first in a conversation that has no system message, and its
   ``chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``) are passed to the template

A ``.json`` file holding a list of strings (e.g. ``alignkit/assets/demo/heldout_openings.json``) is read
as text prompts (they have no columns). Every problem in a file is reported at once as
``file:line: field 'name': ...``, a column the rewards read (``columns=``) that a row lacks included.

Encoding (:func:`encode_prompt`) follows the offline path's BOS rule (``tokenize.adds_special_tokens``):
the tokenizer's special tokens are added unless the text already begins with the BOS text, as a template
that writes ``{{ bos_token }}`` (Llama 3, Gemma, Mistral) renders it: one BOS, never two, never none.
A causal policy's prompt ends where its text ends: what the tokenizer appends after it (the EOS of a
tokenizer set to ``add_eos_token=True``, as some Llama and Mistral checkpoints ship) is left out, as the
offline path leaves it out of its prompts, since the policy would otherwise continue after an end of
sequence. An encoder-decoder's source (PPO on T5) keeps it: T5 was trained on inputs ending in its EOS.
Over ``max_prompt_length`` (:func:`encode_prompt_rows`), a text prompt keeps its BOS and its last tokens,
where the completion starts (``tokenize.truncate``, as offline); a conversational prompt is refused at
its row (or, with on_bad_rows=skip, dropped and listed), because cut from the left it would lose its
BOS, system message and the template's header, and cut from the right its generation prompt (verl's
default, ``truncation: error``, refuses it too).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.chat import Issues, json_type, messages_problems, render_messages, with_system_prompt
from alignkit.data.checks import unknown_text_rows
from alignkit.data.load import check_template_used, load_row_file, raise_or_skip, template_settings
from alignkit.data.prepare import bad_rows_list, report_dropped, split_eval
from alignkit.data.readers import DataError, DroppedRow, Problems, encoding_problems
from alignkit.data.tokenize import adds_special_tokens, truncate

PROMPT_FORMATS = "{prompt: string}; {prompt: [messages]}; or {messages: [messages]}"


@dataclass
class PromptRow:
    """One prompt as the policy sees it (conversations rendered), its conversation, and where it came from."""

    prompt: str
    """The text the policy continues: a conversation rendered with the chat template."""
    messages: list[dict] | None = None
    """A conversational row's messages (the system prompt setting's included); None for a text row."""
    source: str = ""
    line: int = 0
    columns: dict = field(default_factory=dict)
    """The row's other keys (e.g. a math problem's `answer`), for the reward sources that read them."""

    @property
    def origin(self) -> str:
        """Where the row came from, as file:line."""
        return f"{self.source}:{self.line}"

    @property
    def reward_input(self) -> str | list[dict]:
        """The prompt as reward sources read it: a conversational row's messages (a reward model renders
        them in its own chat template, a judge reads their content), else the text."""
        return self.messages if self.messages is not None else self.prompt


def encode_prompt(tokenizer: Any, text: str, *, encoder_decoder: bool = False) -> list[int]:
    """Token ids of a prompt text as the policy reads it: one BOS, and for a causal policy nothing after
    the text's own tokens; an `encoder_decoder` source keeps what the tokenizer appends (see the module
    docstring)."""
    add = adds_special_tokens(tokenizer, text)
    ids = list(tokenizer(text, add_special_tokens=add)["input_ids"])
    if not add or encoder_decoder or not ids or ids[-1] not in tokenizer.all_special_ids:
        return ids
    # Special tokens were appended: keep the ids up to the end of the text's own ones.
    own = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(len(ids) - len(own) + 1):
        if own and ids[start : start + len(own)] == own:
            return ids[: start + len(own)]
    return ids


def encode_prompt_rows(
    rows: list[PromptRow],
    tokenizer: Any,
    max_prompt_length: int,
    skipped: list[DroppedRow] | None = None,
    *,
    encoder_decoder: bool = False,
) -> tuple[list[PromptRow], list[list[int]], int]:
    """(rows kept, their token ids, how many were cut) for prompt rows, by :func:`encode_prompt` (an
    `encoder_decoder` policy's sources keep what the tokenizer appends).

    A text prompt over `max_prompt_length` tokens keeps its BOS and its last tokens; a conversational one
    is a DataError naming file:line (every such row at once), or given `skipped` (on_bad_rows=skip) it is
    left out and appended there (see the module docstring)."""
    problems: dict[str, Problems] = {}
    kept, ids, cut = [], [], 0
    for row in rows:
        encoded = encode_prompt(tokenizer, row.prompt, encoder_decoder=encoder_decoder)
        if len(encoded) > max_prompt_length:
            if row.messages is not None:
                problems.setdefault(row.source, Problems(row.source)).add(
                    row.line,
                    "prompt",
                    f"the conversation is {len(encoded)} tokens once rendered with the chat template, over "
                    f"max_prompt_length={max_prompt_length} (a conversation is never cut: it would lose its "
                    "start or its generation prompt); shorten it or raise max_prompt_length",
                )
                continue
            encoded, _ = truncate(
                encoded, [], max_prompt_length, max_prompt_length, bos_token_id=tokenizer.bos_token_id
            )
            cut += 1
        kept.append(row)
        ids.append(encoded)
    for source_problems in problems.values():
        raise_or_skip(source_problems, skipped)
    if rows and not kept:
        raise DataError(f"no usable prompts: every one is over max_prompt_length={max_prompt_length}")
    return kept, ids, cut


def missing_columns(keys, columns: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """(field, problem) for each of `columns` (what the reward sources read) not among a row's `keys`."""
    return [
        (name, "missing (a reward source reads this column: add it to every row, or leave that source out)")
        for name in columns
        if name not in keys
    ]


def _prompt_row(
    record: dict, tokenizer: Any, issues: Issues, *, template: dict, columns: tuple[str, ...] = ()
) -> PromptRow | None:
    n = len(issues)
    issues.extend(missing_columns(record, columns))
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
    extra = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
    if isinstance(value, str):
        return PromptRow(value, columns=extra)
    messages = with_system_prompt(value, template.get("system_prompt"))
    try:
        text = render_messages(
            tokenizer,
            messages,
            add_generation_prompt=True,
            template_kwargs=template.get("chat_template_kwargs"),
        )
    except Exception as e:  # a template's own raise_exception(...), e.g. a system role it does not take
        issues.append((key, f"cannot render with the chat template: {e}"))
        return None
    return PromptRow(text, messages, columns=extra)


def load_prompt_rows(
    source: str,
    split: str | None = None,
    tokenizer: Any = None,
    skipped: list[DroppedRow] | None = None,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
    columns: tuple[str, ...] | list[str] = (),
) -> list[PromptRow]:
    """Read and validate prompt rows from ``source`` (a .jsonl/.json/.parquet file, a saved dataset or a
    hub dataset name; or a .json list of strings). All problems are raised as one DataError, as is an
    empty source; given ``skipped`` (on_bad_rows=skip), bad rows are left out and appended to it. A row
    must hold each of ``columns`` (the ones the reward sources read: `RewardSet.columns`).
    Conversations get ``system_prompt`` and ``chat_template_kwargs`` (see the module docstring); either
    set for a source with no conversational row, or template variables for a tokenizer with no chat
    template, is a ConfigError (it would do nothing)."""
    template = template_settings(tokenizer, system_prompt, chat_template_kwargs)
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
                for name, reason in missing_columns((), columns):
                    problems.add(n, name, reason + " (a list of strings has no columns: write rows)")
            raise_or_skip(problems, skipped)
            good = [PromptRow(p, None, source, n) for n, p in enumerate(data, 1) if n not in problems.lines]
            if not good:
                raise DataError("no prompts (the list is empty)" if not data else "no usable prompts", source)
            check_template_used(source, template, conversational=False)
            return good
    settings = {"system_prompt": system_prompt, "chat_template_kwargs": chat_template_kwargs}
    parse = functools.partial(_prompt_row, columns=tuple(columns))
    return load_row_file(source, split, tokenizer, parse, kind="prompt", skipped=skipped, **settings)


@dataclass
class Prompts:
    """A run's training and eval prompts, as rows (text, where they came from) and token ids."""

    train_rows: list[PromptRow]
    eval_rows: list[PromptRow]
    train_ids: list[list[int]]
    eval_ids: list[list[int]]


def load_prompts(
    cfg, tokenizer, log=print, *, encoder_decoder: bool = False, columns: tuple[str, ...] = ()
) -> Prompts:
    """The config's prompt rows, validated (file:line:field) and tokenised by the one prompt encoder
    (`data.prompts`: one BOS; a causal prompt ends at its text, an `encoder_decoder` policy's source keeps
    the EOS its tokenizer appends; a conversation over max_prompt_length refused) before any model loads; the
    eval prompts are `eval_data` or an `eval_fraction` of `data`. Conversations get the config's
    system_prompt and chat_template_kwargs. Every train and eval row must hold each of `columns` (what the
    reward sources read, `RewardSet.columns`). With on_bad_rows=skip bad rows are left out, listed in the
    log and in output_dir/dropped_rows.jsonl."""
    skipped = bad_rows_list(cfg)  # on_bad_rows=skip collects the bad rows here instead of refusing
    template = {"system_prompt": cfg.system_prompt, "chat_template_kwargs": cfg.chat_template_kwargs}
    template["columns"] = columns
    rows = load_prompt_rows(cfg.data, cfg.data_split, tokenizer, skipped, **template)
    if cfg.eval_data:
        eval_rows = load_prompt_rows(cfg.eval_data, cfg.eval_split, tokenizer, skipped, **template)
        train_rows = rows
    else:
        train_rows, eval_rows = split_eval(rows, cfg.eval_fraction, cfg.seed)
    for warning in unknown_text_rows(train_rows + eval_rows, tokenizer):
        log(warning)
    train_rows, train_ids, cut = encode_prompt_rows(
        train_rows, tokenizer, cfg.max_prompt_length, skipped, encoder_decoder=encoder_decoder
    )
    eval_rows, eval_ids, eval_cut = encode_prompt_rows(
        eval_rows, tokenizer, cfg.max_prompt_length, skipped, encoder_decoder=encoder_decoder
    )
    report_dropped(cfg, skipped or [], log)
    log(
        f"{len(train_rows)} training and {len(eval_rows)} eval prompts; {cut + eval_cut} cut to max_prompt_length"
    )
    return Prompts(train_rows, eval_rows, train_ids, eval_ids)
