"""Loss functions: pure functions of log-probs (and rewards) -> per-example losses and metrics."""

from alignkit.losses.preference import LOSSES, LossOutput, LossSpec, get_loss, preference_loss

__all__ = ["LOSSES", "LossOutput", "LossSpec", "get_loss", "preference_loss"]
