"""Unpaired preference objectives: KTO and BCO, on single completions labelled desirable or undesirable.

Each objective takes per-sequence log-prob sums of a batch of completions, shape (B,), under the policy and
the reference, and a (B,) bool `desirable` label, and returns an `UnpairedOutput`. Registered in
`UNPAIRED_LOSSES` (the same `LossSpec` entries as the paired registry) and trained by `alignkit kto`; the
equations, papers and when to choose each are in docs/objectives.md.

Notation: r = log πθ(y|x) − log πref(y|x) is a completion's log-ratio and β·r its implicit reward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from alignkit.losses.registry import LossSpec, lookup
from alignkit.losses.types import UnpairedOutput

__all__ = ["UNPAIRED_LOSSES", "bco_loss", "get_unpaired_loss", "kto_loss", "kto_reference_point"]


def kto_reference_point(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024): KL(πθ ‖ πref) estimated in the batch.

        z0 = max(0, mean_i [log πθ(y_j|x_i) − log πref(y_j|x_i)]),    j ≠ i

    The inputs, (B,), are log-prob sums of mismatched pairs: the batch's prompts, each with another row's
    completion (`alignkit.data.collate.mismatched_partners`: row i's prompt with row i−1's completion), so
    the completion is a sample unrelated to the prompt, as the paper's estimator needs. z0 is detached: it
    sets the level rewards are measured against, and no gradient flows through it (as in the paper).
    `reduce` (e.g. `lambda t: accelerator.reduce(t, "mean")`) averages the batch mean over processes
    before the clamp, so every process uses the same z0. Returns a 0-d tensor.
    """
    z0 = (policy_kl_logps - ref_kl_logps).detach().float().mean()
    if reduce is not None:
        z0 = reduce(z0)
    return z0.clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

        v(x, y) = λ_D·σ(β·(r − z0))   if y is desirable
                  λ_U·σ(β·(z0 − r))   if y is undesirable
        loss    = λ_y − v(x, y)

    z0 = `kl` is the reference point (`kto_reference_point`), treated as a constant. λ_D =
    `desirable_weight`, λ_U = `undesirable_weight`; the paper sets them so that λ_D·n_D / (λ_U·n_U) is in
    [1, 4/3] for n_D desirable and n_U undesirable rows. policy_logps, ref_logps: (B,) sums; desirable:
    (B,) bool. At r = z0 every row's loss is λ_y / 2.
    """
    r = policy_logps - ref_logps  # (B,)
    z0 = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach()
    desirable = desirable.to(device=r.device, dtype=torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r))),
    )
    return UnpairedOutput(losses, (beta * r).detach(), {"kl": float(z0)})


def bco_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    delta: float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedOutput:
    """BCO (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment").

        loss = λ_D·(−log σ(β·r − δ))      if y is desirable
               λ_U·(−log σ(−(β·r − δ)))   if y is undesirable

    A logistic classifier of desirability whose logit is the implicit reward β·r shifted by δ, the running
    mean of the implicit rewards of all previous training batches (loop state, as in the paired
    `bco_pair`; 0 at the start, when policy = reference). The class weights λ_D, λ_U play the role they
    play in KTO (the paper's loss has λ_D = λ_U = 1). All inputs (B,); desirable is bool.
    """
    rewards = beta * (policy_logps - ref_logps)  # (B,)
    desirable = desirable.to(device=rewards.device, dtype=torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * -F.logsigmoid(rewards - delta),
        undesirable_weight * -F.logsigmoid(-(rewards - delta)),
    )
    return UnpairedOutput(losses, rewards.detach(), {"delta": float(delta)})


UNPAIRED_LOSSES: dict[str, LossSpec] = {
    "kto": LossSpec(
        kto_loss,
        needs_reference=True,
        params=("beta", "desirable_weight", "undesirable_weight"),
        inputs=("kl",),
        paper="Ethayarajh et al. 2024 (KTO)",
    ),
    "bco": LossSpec(
        bco_loss,
        needs_reference=True,
        params=("beta", "desirable_weight", "undesirable_weight"),
        inputs=("delta",),
        paper="Jung et al. 2024 (BCO)",
    ),
}


def get_unpaired_loss(name: str) -> LossSpec:
    """The registered unpaired objective called `name`; a clear error listing the valid names otherwise."""
    return lookup(name, UNPAIRED_LOSSES, "unpaired loss")
