"""What every preference objective returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


@dataclass
class UnpairedOutput:
    """What every unpaired objective (KTO, BCO) returns.

    losses: (B,) per-example loss (the training loop averages it).
    rewards: (B,) implicit rewards β·(log πθ(y|x) − log πref(y|x)), detached.
    metrics: extra scalar diagnostics, name -> float.
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ListwiseOutput:
    """What every listwise objective returns.

    losses: (B,) per-list loss (the training loop averages it).
    rewards: (B, K) implicit rewards of each list's responses, detached; padded slots hold 0.
    metrics: extra scalar diagnostics, name -> float.
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
