"""Constraint terms added to a paired objective's loss ("constitutional" penalties).

A constraint holds the policy to a rule the preference pairs alone do not state, e.g. "whatever the labels
say, a response flagged unsafe must not earn a high implicit reward". Each term is a pure function of
per-pair quantities, shape (B,), returning a (B,) penalty; `constraint_losses` weights and sums the terms
that `DPOConfig.constraints` lists, and the training loop adds the sum to the objective's per-pair loss.
docs/objectives.md ("Constraints") has the use case and the settings.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = [
    "CONSTRAINT_TYPES",
    "check_constraints",
    "constraint_losses",
    "flagged_reward_penalty",
    "implicit_rewards",
    "nll_anchor",
]

CONSTRAINT_TYPES = ("flagged_reward", "nll_anchor")
# Settings each type reads, besides `weight` (any other one set to a non-default value is an error).
CONSTRAINT_PARAMS = {
    "flagged_reward": ("threshold", "temperature", "scorer", "cutoff", "flag_when"),
    "nll_anchor": (),
}


def implicit_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    *,
    beta: float,
    length_normalised: bool = False,
) -> torch.Tensor:
    """The implicit reward a constraint judges, (B,), with its gradient: β·(log πθ(y|x) − log πref(y|x)).

    On the log-probs the objective itself compares: per-token means (divided by `lengths`) for a
    length-normalised objective, sums otherwise; a reference-free objective has no πref term (SimPO's and
    CPO's reward β·log πθ). For ORPO it is β·mean log πθ, not the log-odds ORPO reports.
    """
    ratio = logps if ref_logps is None else logps - ref_logps
    if length_normalised:
        ratio = ratio / lengths.clamp(min=1)
    return beta * ratio


def flagged_reward_penalty(
    rewards: torch.Tensor, flagged: torch.Tensor, *, threshold: float = 0.0, temperature: float = 0.1
) -> torch.Tensor:
    """Penalty on flagged responses whose implicit reward exceeds `threshold`, (B,).

        penalty = flagged · τ·softplus((r − t)/τ)    (τ > 0)
                  flagged · max(0, r − t)            (τ = 0, the hinge)

    τ·softplus(·/τ) is the hinge smoothed over a width τ (in reward units): its slope in r is
    σ((r − t)/τ), ½ at the threshold and at most 1 whatever τ, so `weight` keeps its meaning as τ
    changes, and τ → 0 recovers the hinge. Unflagged responses are never penalised. rewards: (B,) with
    gradient (`implicit_rewards`); flagged: (B,) bool.
    """
    excess = rewards - threshold
    if temperature > 0:
        penalty = temperature * F.softplus(excess / temperature)
    else:
        penalty = torch.relu(excess)
    return torch.where(flagged.to(device=rewards.device, dtype=torch.bool), penalty, 0.0)


def nll_anchor(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen completion, −log πθ(y_w|x) / |y_w|, (B,).

    An anchor that keeps the preferred responses likely while the objective moves the margin (DPO can
    lower both responses' likelihood); as a constraint it can be added to any paired objective.
    """
    return -chosen_logps / chosen_lengths.clamp(min=1)


def constraint_losses(
    constraints: list,
    *,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    flagged: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ_c weight_c · term_c, (B,), over `constraints` (ConstraintSettings), and a metric per term.

    chosen_rewards, rejected_rewards: (B,) implicit rewards with gradient; chosen_logps: (B,) sums;
    chosen_lengths: (B,) token counts; flagged: (B, F, 2) bool, for the F flagged_reward constraints in
    order, whether the chosen ([..., 0]) and the rejected ([..., 1]) response is flagged. A flagged_reward
    term is the penalty of the chosen plus that of the rejected response. Metrics
    `constraint/<type>` (numbered `<type>_<k>` when a type repeats) hold the mean unweighted term.
    """
    total = torch.zeros_like(chosen_logps)
    metrics: dict[str, float] = {}
    types = [c.type for c in constraints]
    k_flagged = 0
    for i, c in enumerate(constraints):
        if c.type == "flagged_reward":
            if flagged is None:
                raise ValueError("a flagged_reward constraint needs the batch's `flagged` (B, F, 2) flags")
            flags = flagged[:, k_flagged]
            k_flagged += 1
            settings = {"threshold": c.threshold, "temperature": c.temperature}
            term = flagged_reward_penalty(chosen_rewards, flags[:, 0], **settings) + flagged_reward_penalty(
                rejected_rewards, flags[:, 1], **settings
            )
        elif c.type == "nll_anchor":
            term = nll_anchor(chosen_logps, chosen_lengths)
        else:
            raise ValueError(f"unknown constraint type '{c.type}' (valid: {', '.join(CONSTRAINT_TYPES)})")
        total = total + c.weight * term
        name = c.type if types.count(c.type) == 1 else f"{c.type}_{types[:i].count(c.type) + 1}"
        metrics[f"constraint/{name}"] = float(term.detach().mean())
    return total, metrics


def check_constraints(constraints: list, defaults) -> None:
    """Raise a ValueError naming `constraints[i]` for an unknown type, a bad value, or a setting the type
    does not read (compared with `defaults`, a default ConstraintSettings)."""
    for i, c in enumerate(constraints):
        where = f"constraints[{i}]"
        if c.type not in CONSTRAINT_TYPES:
            raise ValueError(f"{where}: type {c.type!r} is not one of {', '.join(CONSTRAINT_TYPES)}")
        for name in ("weight", "threshold", "temperature", "cutoff"):
            value = getattr(c, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{where}: {name}={value!r} is not a finite number")
        if c.weight < 0 or c.temperature < 0:
            raise ValueError(
                f"{where}: weight and temperature must be >= 0 (got {c.weight}, {c.temperature})"
            )
        if c.flag_when not in ("below", "above"):
            raise ValueError(f"{where}: flag_when={c.flag_when!r} is not 'below' or 'above'")
        for name in vars(defaults):
            if name not in ("type", "weight", *CONSTRAINT_PARAMS[c.type]):
                if getattr(c, name) != getattr(defaults, name):
                    raise ValueError(
                        f"{where}: {name}={getattr(c, name)!r} is not used by a {c.type} constraint (it uses "
                        f"{', '.join(('weight', *CONSTRAINT_PARAMS[c.type]))}); remove it"
                    )
        if c.scorer is None and (c.cutoff != defaults.cutoff or c.flag_when != defaults.flag_when):
            raise ValueError(
                f"{where}: cutoff and flag_when apply to a scorer's scores; set `scorer` or remove them"
            )
