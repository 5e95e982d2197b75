"""Loss functions: pure functions of log-probs (and rewards) -> per-example losses and metrics.

Three registries of `LossSpec` entries, one per shape of data: `LOSSES` (paired: `alignkit dpo`),
`UNPAIRED_LOSSES` (labelled single completions: `alignkit kto`) and `LISTWISE_LOSSES` (a list of responses
per prompt: `alignkit listwise`), built from the machinery in `registry`. `constraints` holds terms any
paired objective can add.
"""

from alignkit.losses.listwise import LISTWISE_LOSSES, get_listwise_loss
from alignkit.losses.preference import GPO_CONVEX, LOSSES, check_params, get_loss, preference_loss
from alignkit.losses.registry import LossSpec, RunningMean
from alignkit.losses.types import ListwiseOutput, LossOutput, UnpairedOutput
from alignkit.losses.unpaired import UNPAIRED_LOSSES, get_unpaired_loss

__all__ = [
    "GPO_CONVEX",
    "LISTWISE_LOSSES",
    "LOSSES",
    "UNPAIRED_LOSSES",
    "ListwiseOutput",
    "LossOutput",
    "LossSpec",
    "RunningMean",
    "UnpairedOutput",
    "check_params",
    "get_listwise_loss",
    "get_loss",
    "get_unpaired_loss",
    "preference_loss",
]
