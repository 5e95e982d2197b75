"""Loss functions: pure functions of log-probs (and rewards) -> per-example losses and metrics.

Three registries of `LossSpec` entries, one per shape of data: `LOSSES` (paired: `alignkit dpo`),
`UNPAIRED_LOSSES` (labelled single completions: `alignkit kto`) and `LISTWISE_LOSSES` (a list of responses
per prompt: `alignkit listwise`), built from the machinery in `registry`. `constraints` holds terms any
paired objective can add. `policy` holds the maths of online RL (KL estimators, group advantages in the
`ADVANTAGES` registry, the one loss aggregation); `policy_losses` its policy term (the clipped surrogate,
GSPO, CISPO in the `POLICY_LOSSES` registry).
"""

from alignkit.losses.listwise import LISTWISE_LOSSES, get_listwise_loss
from alignkit.losses.policy import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    AdvantageSpec,
    aggregate,
    aggregation_units,
    compute_advantages,
    get_advantage,
    kl_estimate,
)
from alignkit.losses.policy_losses import POLICY_LOSSES, PolicyLossSpec, clipped_surrogate, get_policy_loss
from alignkit.losses.preference import GPO_CONVEX, LOSSES, check_params, get_loss, preference_loss
from alignkit.losses.registry import LossSpec, RunningMean
from alignkit.losses.types import ListwiseOutput, LossOutput, UnpairedOutput
from alignkit.losses.unpaired import UNPAIRED_LOSSES, get_unpaired_loss

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "GPO_CONVEX",
    "KL_ESTIMATORS",
    "LISTWISE_LOSSES",
    "LOSSES",
    "POLICY_LOSSES",
    "UNPAIRED_LOSSES",
    "AdvantageSpec",
    "ListwiseOutput",
    "LossOutput",
    "LossSpec",
    "PolicyLossSpec",
    "RunningMean",
    "UnpairedOutput",
    "aggregate",
    "aggregation_units",
    "check_params",
    "clipped_surrogate",
    "compute_advantages",
    "get_advantage",
    "get_listwise_loss",
    "get_loss",
    "get_policy_loss",
    "get_unpaired_loss",
    "kl_estimate",
    "preference_loss",
]
