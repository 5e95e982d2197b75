"""Loss functions: pure functions of log-probs (and rewards) -> per-example losses and metrics."""

from alignkit.losses.preference import (
    GPO_CONVEX,
    LOSSES,
    LossOutput,
    LossSpec,
    RunningMean,
    check_params,
    get_loss,
    preference_loss,
)

__all__ = [
    "GPO_CONVEX",
    "LOSSES",
    "LossOutput",
    "LossSpec",
    "RunningMean",
    "check_params",
    "get_loss",
    "preference_loss",
]
