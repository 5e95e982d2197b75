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


def collate_pairs_shared_prompt(examples: list[dict], pad_id: int) -> dict:
    """Preference examples -> B rows [prompt | chosen | rejected]: each pair's prompt is computed once.

    Rejected tokens must not see the chosen ones, so the batch carries a (B, T, T) boolean `allowed`
    matrix (causal, minus the rejected-to-chosen block; padding sees only itself, which keeps softmax
    finite) for a 4D attention mask, position ids that restart the rejected block at len(prompt), and
    `source_index`: the position whose hidden state predicts each token (t - 1, except the first
    rejected token, predicted from the last prompt token). chosen_mask / rejected_mask mark the two
    completions. The prompt-length share of the tokens (most of HH) is no longer computed twice.
    """
    B = len(examples)
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    T = max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    source_index = (torch.arange(T) - 1).clamp(min=0).repeat(B, 1)
    chosen_mask = torch.zeros((B, T), dtype=torch.long)
    rejected_mask = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)).repeat(B, 1, 1)  # (B, T, T)
    for b, e in enumerate(examples):
        P, C, R = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
        n = P + C + R
        input_ids[b, :n] = torch.tensor(e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"])
        position_ids[b, : P + C] = torch.arange(P + C)
        position_ids[b, P + C : n] = torch.arange(P, P + R)
        position_ids[b, n:] = torch.arange(T - n)
        chosen_mask[b, P : P + C] = 1
        rejected_mask[b, P + C : n] = 1
        source_index[b, P + C] = P - 1
        allowed[b, P + C : n, P : P + C] = False  # rejected never sees chosen
        allowed[b, n:, :] = False
        allowed[b, :, n:] = False
        allowed[b, n:, n:] = torch.eye(T - n, dtype=torch.bool)
    return {
        "input_ids": input_ids,
        "allowed": allowed,
        "position_ids": position_ids,
        "source_index": source_index,
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
        "attention_mask": (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long(),  # (B, T)
        **pair_columns(examples),
    }
