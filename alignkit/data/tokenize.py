"""Prompt/completion tokenisation with an exact loss mask, truncation, and an on-disk cache.

The boundary problem: tokenising `prompt` and `completion` separately and concatenating the ids gives a
sequence the model never saw in pre-training (SentencePiece tokenizers prepend a word marker to the
completion; BPE ones split words differently), while tokenising `prompt + completion` and cutting at
len(tokenize(prompt)) puts a token that merges the last prompt characters with the first completion
characters on the wrong side (TinyStories: 'time' + ' there' -> '...tim', 'e▁', 'there▁').

Here the text `prompt + completion` is tokenised once, and with the tokenizer's character offsets the
completion is every token that holds at least one completion character; the prompt is the tokens that lie
wholly inside the prompt text. No completion character escapes the loss mask and no token that is all
prompt is trained on. For a pair, chosen and rejected share the longest prompt-token prefix both agree on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from alignkit.data.rows import ListwiseRow, LoggedRow, PreferenceRow, SFTRow, UnpairedRow
from alignkit.io import atomic_write


@dataclass
class TokenStats:
    """Counts a tokenisation pass reports."""

    rows: int = 0
    dropped_empty: int = 0
    """Rows left with no completion tokens after truncation (dropped)."""
    truncated_prompts: int = 0
    truncated_completions: int = 0


def adds_special_tokens(tokenizer, prompt: str) -> bool:
    """Whether a text starting with `prompt` is tokenised with the tokenizer's special tokens (its BOS):
    yes, unless the prompt already begins with the BOS text, as a chat template that writes
    {{ bos_token }} (Llama 3, Gemma, Mistral) renders it; never two BOS tokens, and never none."""
    bos = tokenizer.bos_token
    return not (bos and prompt.startswith(bos))


def _full_encoding(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """Ids of `prompt + completion` and the number of leading tokens that lie wholly in the prompt."""
    add_special = adds_special_tokens(tokenizer, prompt)
    text = prompt + completion
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        boundary = len(prompt)
        n_prompt = 0
        for start, end in offsets:
            if end > boundary or (start >= boundary and end > start):
                break
            n_prompt += 1
        # Special tokens appended at the end (an EOS post-processor) have (0, 0) offsets: keep them
        # out of the prompt count by stopping at the first token that is not wholly in the prompt.
        return list(ids), n_prompt
    # Slow tokenizers give no offsets: cut where the prompt's own ids stop being a prefix.
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    n = 0
    while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
        n += 1
    return list(ids), n


def encode_prompt_completions(
    tokenizer, prompt: str, completions: list[str], add_eos: bool = True
) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt shared by several completions, and each completion's ids.

    prompt_ids + completion_ids[i] is the tokenisation of `prompt + completions[i]` (the shared prompt is
    the longest run of prompt-only tokens all completions agree on). EOS is appended to each completion
    when `add_eos` and the tokenizer has one.
    """
    encodings = [_full_encoding(tokenizer, prompt, c) for c in completions]
    n = min(k for _, k in encodings)
    first = encodings[0][0]
    while n > 0 and any(ids[:n] != first[:n] for ids, _ in encodings):
        n -= 1
    eos = tokenizer.eos_token_id
    completion_ids = []
    for ids, _ in encodings:
        c = ids[n:]
        if add_eos and eos is not None and (not c or c[-1] != eos):
            c = c + [eos]
        completion_ids.append(c)
    return first[:n], completion_ids


def truncate(
    prompt_ids: list[int],
    completion_ids: list[list[int]],
    max_length: int,
    max_prompt_length: int,
    *,
    bos_token_id: int | None,
    stats: TokenStats | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Prompt cut from the left (keeping its end, and the BOS token), completions from the right."""
    if len(prompt_ids) > max_prompt_length:
        keep_bos = bos_token_id is not None and prompt_ids and prompt_ids[0] == bos_token_id
        tail = prompt_ids[len(prompt_ids) - (max_prompt_length - int(keep_bos)) :]
        prompt_ids = ([bos_token_id] if keep_bos else []) + tail
        if stats:
            stats.truncated_prompts += 1
    room = max(max_length - len(prompt_ids), 0)
    out = []
    for c in completion_ids:
        if len(c) > room and stats:
            stats.truncated_completions += 1
        out.append(c[:room])
    return prompt_ids, out


def tokenize_preference_rows(
    rows: list[PreferenceRow], tokenizer, max_length: int, max_prompt_length: int
) -> tuple[list[dict], TokenStats]:
    """Rows -> examples {prompt_ids, chosen_ids, rejected_ids, preference, line, and margin, chosen_flagged,
    rejected_flagged when the row has them}; empty ones dropped."""
    stats = TokenStats()
    examples = []
    for row in rows:
        if row.prompt_ids is not None:
            # Pre-tokenised rows (e.g. on-policy samples) are used exactly as given.
            prompt_ids, (chosen, rejected) = row.prompt_ids, [row.chosen_ids, row.rejected_ids]
        else:
            prompt_ids, (chosen, rejected) = encode_prompt_completions(
                tokenizer, row.prompt, [row.chosen, row.rejected]
            )
        prompt_ids, (chosen, rejected) = truncate(
            prompt_ids,
            [chosen, rejected],
            max_length,
            max_prompt_length,
            bos_token_id=tokenizer.bos_token_id,
            stats=stats,
        )
        if not chosen or not rejected or not prompt_ids:
            stats.dropped_empty += 1
            continue
        example = {
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "preference": 1.0 if row.preference is None else float(row.preference),
            "line": row.line,
        }
        if row.margin is not None:
            example["margin"] = float(row.margin)
        for key in ("chosen_flagged", "rejected_flagged"):
            if getattr(row, key) is not None:
                example[key] = getattr(row, key)
        examples.append(example)
    stats.rows = len(examples)
    return examples, stats


def tokenize_sft_rows(
    rows: list[SFTRow], tokenizer, max_length: int, max_prompt_length: int
) -> tuple[list[dict], TokenStats]:
    """Rows -> examples {prompt_ids, completion_ids, line}, plus `label` for unpaired (KTO) rows and `reward`
    and `prompt` (the text) for logged (offline RL) rows; rows with no completion tokens dropped."""
    stats = TokenStats()
    examples = []
    for row in rows:
        prompt_ids, (completion,) = encode_prompt_completions(tokenizer, row.prompt, [row.completion])
        prompt_ids, (completion,) = truncate(
            prompt_ids,
            [completion],
            max_length,
            max_prompt_length,
            bos_token_id=tokenizer.bos_token_id,
            stats=stats,
        )
        if not completion or not prompt_ids:
            stats.dropped_empty += 1
            continue
        example = {"prompt_ids": prompt_ids, "completion_ids": completion, "line": row.line}
        if isinstance(row, UnpairedRow):
            example["label"] = row.label
        if isinstance(row, LoggedRow):  # the prompt text groups a prompt's responses (its ids can differ)
            example["reward"], example["prompt"] = row.reward, row.prompt
        examples.append(example)
    stats.rows = len(examples)
    return examples, stats


def tokenize_listwise_rows(
    rows: list[ListwiseRow], tokenizer, max_length: int, max_prompt_length: int
) -> tuple[list[dict], TokenStats]:
    """Rows -> examples {prompt_ids, responses_ids, line, and the row's scores, probs or ranking}; a row
    with a response left empty after truncation is dropped whole (its target covers every response)."""
    stats = TokenStats()
    examples = []
    for row in rows:
        prompt_ids, responses = encode_prompt_completions(tokenizer, row.prompt, row.responses)
        prompt_ids, responses = truncate(
            prompt_ids,
            responses,
            max_length,
            max_prompt_length,
            bos_token_id=tokenizer.bos_token_id,
            stats=stats,
        )
        if not prompt_ids or not all(responses):
            stats.dropped_empty += 1
            continue
        example = {"prompt_ids": prompt_ids, "responses_ids": responses, "line": row.line}
        for key in ("scores", "probs", "ranking"):
            if getattr(row, key) is not None:
                example[key] = getattr(row, key)
        examples.append(example)
    stats.rows = len(examples)
    return examples, stats


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable parts (cache keys)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def source_fingerprint(source: str) -> str:
    """Identity of a data source: path, size and modification time for files; the name otherwise."""
    if os.path.exists(source):
        st = os.stat(source)
        return fingerprint(os.path.abspath(source), st.st_size, st.st_mtime_ns)
    return fingerprint(source)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer: its vocabulary, special tokens and chat template."""
    return fingerprint(
        tokenizer.name_or_path,
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        getattr(tokenizer, "chat_template", None),
        sorted(tokenizer.get_vocab().items())[:: max(len(tokenizer) // 256, 1)],
    )


def cached(path: Path, build):
    """Load JSON from `path` if present, else `build()` it and write it atomically."""
    if path.exists():
        with open(path) as f:
            return json.load(f)
    value = build()
    atomic_write(path, json.dumps(value))
    return value
