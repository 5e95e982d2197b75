"""Paired preference objectives: pure functions of per-sequence log-probs.

Each objective takes per-sequence log-prob sums of the chosen and rejected completions (shape (B,)) under
the policy and, when it needs one, the reference model, and returns a `LossOutput`. Registering an
objective is one entry in `LOSSES`, which also states what the training loop must provide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    """What every preference objective returns.

    losses: (B,) per-example loss (the training loop averages it).
    chosen_rewards, rejected_rewards: (B,) implicit rewards, detached (for logging and accuracy).
    metrics: extra scalar diagnostics, name -> float.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """A registered objective and the facts the training loop needs about it."""

    fn: Callable[..., LossOutput]
    needs_reference: bool
    """True when the objective uses reference log-probs (DPO); False for reference-free ones."""
    length_normalised: bool = False
    """True when the objective wants per-token mean log-probs rather than sums."""
    paper: str = ""
    """Where the objective comes from."""


def sigmoid_dpo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    preference: torch.Tensor | None = None,
) -> LossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7), with conservative and soft labels.

    h = (log πθ(y_w|x) − log πref(y_w|x)) − (log πθ(y_l|x) − log πref(y_l|x)), all inputs (B,).
    With p = P(chosen is really better) (per row `preference`, default 1) and label smoothing ε
    (cDPO: the label is flipped with probability ε), the effective label is p' = (1−ε)·p + ε·(1−p) and

        loss = −( p'·log σ(β·h) + (1 − p')·log σ(−β·h) ).

    p = 1, ε = 0 is the original DPO loss; p = 0.5 has zero gradient with respect to h at h = 0 and pulls
    h back towards 0 elsewhere.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    p = torch.ones_like(h) if preference is None else preference.to(h.dtype)
    p = (1.0 - label_smoothing) * p + label_smoothing * (1.0 - p)
    losses = -(p * F.logsigmoid(beta * h) + (1.0 - p) * F.logsigmoid(-beta * h))
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_dpo, needs_reference=True, paper="Rafailov et al. 2023 (DPO)"),
}


def get_loss(name: str) -> LossSpec:
    """The registered objective called `name`; a clear error listing the valid names otherwise."""
    if name not in LOSSES:
        import difflib

        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown preference loss '{name}'.{hint} Valid: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def preference_loss(
    name: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    **params,
) -> LossOutput:
    """Compute the registered paired objective `name` on per-sequence log-prob sums (shape (B,)).

    Lengths (completion token counts) are required by length-normalised objectives; reference log-probs by
    objectives that need a reference. Missing inputs raise a ValueError naming them.
    """
    spec = get_loss(name)
    if spec.length_normalised:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss '{name}' is length-normalised: pass chosen_lengths and rejected_lengths")
        chosen_logps = chosen_logps / chosen_lengths.clamp(min=1)
        rejected_logps = rejected_logps / rejected_lengths.clamp(min=1)
        if ref_chosen_logps is not None and ref_rejected_logps is not None:
            ref_chosen_logps = ref_chosen_logps / chosen_lengths.clamp(min=1)
            ref_rejected_logps = ref_rejected_logps / rejected_lengths.clamp(min=1)
    if spec.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                f"loss '{name}' needs reference log-probs: pass ref_chosen_logps and ref_rejected_logps"
            )
        return spec.fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **params)
    return spec.fn(chosen_logps, rejected_logps, **params)
