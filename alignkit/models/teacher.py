"""A teacher's token distributions for distillation (and offline RL's full-vocabulary KL): a separate frozen
model or the LoRA policy's own base, and the student's divergence from it as a batch function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from alignkit.logprobs.completion import CompletionStates, completion_states
from alignkit.losses.distill import chunked_divergence
from alignkit.models.reference import adapter_disabled

# The teacher of a batch: (student model as the batch function got it, batch) -> its CompletionStates.
Teacher = Callable[[torch.nn.Module, dict], CompletionStates]


def frozen_teacher(teacher: torch.nn.Module) -> Teacher:
    """The states of a separate frozen model (a distillation teacher, or offline RL's reference copy)."""

    def states(model, batch: dict) -> CompletionStates:
        with torch.no_grad():
            return completion_states(
                teacher, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )

    return states


def base_model_teacher(model, batch: dict) -> CompletionStates:
    """The states of the LoRA policy's own base, adapter off (reference.mode=adapter); its head is the
    base layer when the adapter wraps the head too."""
    with torch.no_grad(), adapter_disabled(model):
        states = completion_states(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
    return dataclasses.replace(states, head=getattr(states.head, "base_layer", states.head))


def completion_divergence(
    model,
    batch: dict,
    teacher: Teacher,
    *,
    beta: float,
    temperature: float,
    chunk_size: int,
    with_logps: bool = False,
) -> dict[str, torch.Tensor]:
    """{"divergence": (B,) the per-token JSD(β) of student `model` from `teacher` summed over each row's
    completion tokens, "tokens": (B,) their number, and with `with_logps` "logps": (B,) the student's
    log-prob sums of those tokens}: one backbone pass per model, the vocabulary projected a chunk at a
    time. The batch function the prepared student runs."""
    student = completion_states(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    target = teacher(model, batch)
    div, logps = chunked_divergence(
        student.hidden,
        target.hidden,
        student.logits,
        target.logits,
        beta=beta,
        temperature=temperature,
        chunk_size=chunk_size,
        targets=student.targets if with_logps else None,
    )  # (N,), (N,) or None

    def per_row(values: torch.Tensor) -> torch.Tensor:  # (N,) -> (B,)
        zeros = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float32, device=values.device)
        return zeros.index_add(0, student.rows, values)

    out = {"divergence": per_row(div), "tokens": per_row(torch.ones_like(div))}
    if logps is not None:
        out["logps"] = per_row(logps)
    return out
