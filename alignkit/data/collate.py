"""Collating tokenised examples into padded tensors with a completion mask."""

from __future__ import annotations

import torch


def pad_sequences(sequences: list[list[int]], completion_starts: list[int], pad_id: int) -> dict:
    """Right-pad token lists into a batch.

    completion_starts[i] is the index in sequences[i] where its completion begins.
    Returns input_ids, attention_mask and completion_mask, each (B, T) with T the longest sequence.
    """
    T = max(len(s) for s in sequences)
    B = len(sequences)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    completion_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, completion_starts)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, start : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Preference examples -> one batch of 2B rows: the B chosen sequences, then the B rejected ones.

    Chosen and rejected go through the model in one forward pass (one kernel launch sequence, one
    weight read) and are split afterwards: rows [:B] are chosen, rows [B:] rejected. `preference` is (B,);
    so is `margin`, present when any example has one (0 for those without: no offset).
    """
    sequences, starts = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            sequences.append(ex["prompt_ids"] + ex[key])
            starts.append(len(ex["prompt_ids"]))
    return {**pad_sequences(sequences, starts, pad_id), **pair_columns(examples)}


def pair_columns(examples: list[dict]) -> dict:
    """Per-pair (B,) columns of a batch: `preference`, and `margin` when any example has one (0 for
    those without: no offset)."""
    columns = {"preference": torch.tensor([ex["preference"] for ex in examples], dtype=torch.float32)}
    if any("margin" in ex for ex in examples):
        columns["margin"] = torch.tensor([ex.get("margin", 0.0) for ex in examples], dtype=torch.float32)
    return columns


def collate_sft(examples: list[dict], pad_id: int) -> dict:
    """SFT examples -> a padded batch whose completion mask covers the completion tokens only."""
    sequences = [ex["prompt_ids"] + ex["completion_ids"] for ex in examples]
    starts = [len(ex["prompt_ids"]) for ex in examples]
    return pad_sequences(sequences, starts, pad_id)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, T, T) boolean `allowed` -> the (R, 1, T, T) additive attention mask transformers takes
    (0 where a query may attend, the dtype's minimum elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: indices of `lengths` grouped into rows of at most `capacity`."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_pairs_shared_prompt(examples: list[dict], pad_id: int, pack: bool = True) -> dict:
    """Preference examples -> rows of [prompt | chosen | rejected] segments: each prompt computed once.

    Each pair is one segment: its prompt, then its chosen and its rejected completion. Rejected tokens
    must not see the chosen ones, so the batch carries a (R, T, T) boolean `allowed` matrix for a 4D
    attention mask: causal within a segment, minus the rejected-to-chosen block, nothing across
    segments; padding sees only itself, which keeps softmax finite. Position ids restart at 0 for each
    segment and at len(prompt) for its rejected block. `source_index` is the position whose hidden state
    predicts each token (t - 1, except a rejected block's first token, predicted from the last prompt
    token). `segment` (R, T) maps every completion token to its pair (-1 elsewhere); chosen_mask /
    rejected_mask mark the two completions.

    With `pack`, segments are packed first-fit into rows no longer than the longest segment, so short
    pairs share a row instead of being padded (fewer rows, the same row length: strictly less work for
    every layer). Without it, one pair per row.
    """
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    T = max(lengths)
    rows = pack_rows(lengths, T) if pack else [[i] for i in range(len(examples))]
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    source_index = (torch.arange(T) - 1).clamp(min=0).repeat(R, 1)
    segment = torch.full((R, T), -1, dtype=torch.long)
    chosen_mask = torch.zeros((R, T), dtype=torch.long)
    rejected_mask = torch.zeros((R, T), dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    allowed = torch.zeros((R, T, T), dtype=torch.bool)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for r, members in enumerate(rows):
        o = 0  # offset of the current segment in the row
        for b in members:
            e = examples[b]
            P, C, N = len(e["prompt_ids"]), len(e["chosen_ids"]), lengths[b]
            input_ids[r, o : o + N] = torch.tensor(e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"])
            position_ids[r, o : o + P + C] = torch.arange(P + C)
            position_ids[r, o + P + C : o + N] = torch.arange(P, N - C)
            source_index[r, o + P + C] = o + P - 1
            segment[r, o + P : o + N] = b
            chosen_mask[r, o + P : o + P + C] = 1
            rejected_mask[r, o + P + C : o + N] = 1
            attention_mask[r, o : o + N] = 1
            allowed[r, o : o + N, o : o + N] = causal[:N, :N]
            allowed[r, o + P + C : o + N, o + P : o + P + C] = False  # rejected never sees chosen
            o += N
        allowed[r, o:, o:] = torch.eye(T - o, dtype=torch.bool)
        position_ids[r, o:] = torch.arange(T - o)
    return {
        "input_ids": input_ids,
        "allowed": allowed,
        "position_ids": position_ids,
        "source_index": source_index,
        "segment": segment,
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
        "attention_mask": attention_mask,  # (R, T): real tokens, for throughput counts
        **pair_columns(examples),
    }


def mismatched_partners(n: int) -> list[int]:
    """For KTO's KL estimate: row i's prompt is paired with the completion of row partner[i] = (i − 1) mod n.

    A rotation, so no row keeps its own completion once n ≥ 2; with n = 1 there is no mismatched pair.
    """
    if n < 2:
        raise ValueError(f"a mismatched prompt/completion pair needs a batch of at least 2 rows, got {n}")
    return [(i - 1) % n for i in range(n)]


def collate_unpaired(examples: list[dict], pad_id: int, mismatched: bool = True) -> dict:
    """Unpaired (KTO) examples -> B rows prompt + completion, then, when `mismatched`, B rows pairing each
    prompt with another row's completion (`mismatched_partners`), whose log-ratios estimate KTO's KL
    reference point: both sets in one forward pass. `label` is (B,) bool (True = desirable).
    """
    sequences = [ex["prompt_ids"] + ex["completion_ids"] for ex in examples]
    starts = [len(ex["prompt_ids"]) for ex in examples]
    if mismatched:
        for ex, j in zip(examples, mismatched_partners(len(examples))):
            sequences.append(ex["prompt_ids"] + examples[j]["completion_ids"])
            starts.append(len(ex["prompt_ids"]))
    batch = pad_sequences(sequences, starts, pad_id)
    batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
    return batch


def collate_lists(examples: list[dict], pad_id: int) -> dict:
    """List examples -> one row per response (N = Σ_b K_b rows, one forward for every list of the batch).

    `list_mask` (B, K) bool marks the slots that hold a response, K being the longest list; `slot` (N,)
    is each row's flat slot b·K + k, so per-row values v (N,) become a (B, K) tensor with
    `zeros(B·K).index_put((slot,), v).view(B, K)`.
    """
    B, K = len(examples), max(len(ex["responses_ids"]) for ex in examples)
    sequences, starts, slots = [], [], []
    list_mask = torch.zeros(B, K, dtype=torch.bool)
    for b, ex in enumerate(examples):
        for k, response in enumerate(ex["responses_ids"]):
            sequences.append(ex["prompt_ids"] + response)
            starts.append(len(ex["prompt_ids"]))
            slots.append(b * K + k)
        list_mask[b, : len(ex["responses_ids"])] = True
    return {**pad_sequences(sequences, starts, pad_id), "list_mask": list_mask, "slot": torch.tensor(slots)}


def completion_tokens(examples: list[dict]) -> int:
    """Number of completion tokens the loss is taken over."""
    return sum(len(e["completion_ids"]) for e in examples)
