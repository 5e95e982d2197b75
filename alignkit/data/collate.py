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
    weight read) and are split afterwards: rows [:B] are chosen, rows [B:] rejected.
    """
    sequences, starts = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            sequences.append(ex["prompt_ids"] + ex[key])
            starts.append(len(ex["prompt_ids"]))
    batch = pad_sequences(sequences, starts, pad_id)
    batch["preference"] = torch.tensor([ex["preference"] for ex in examples], dtype=torch.float32)
    return batch


def collate_sft(examples: list[dict], pad_id: int) -> dict:
    """SFT examples -> a padded batch whose completion mask covers the completion tokens only."""
    sequences = [ex["prompt_ids"] + ex["completion_ids"] for ex in examples]
    starts = [len(ex["prompt_ids"]) for ex in examples]
    return pad_sequences(sequences, starts, pad_id)
