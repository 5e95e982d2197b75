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
