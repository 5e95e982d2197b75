"""The objective registry's machinery, shared by the paired, unpaired and listwise objectives.

`LossSpec` states what an objective needs from the training loop; `lookup` finds one by name in a registry
(`preference.LOSSES`, `unpaired.UNPAIRED_LOSSES`, `listwise.LISTWISE_LOSSES`) and `check_params` turns a
hyperparameter the objective does not use, or a bad value, into an error. `RunningMean` is the loop state
BCO's reward shift is computed from. The objective modules import this one and it imports none of them,
so the unpaired and listwise objectives do not depend on the paired ones.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.losses.types import ListwiseOutput, LossOutput, UnpairedOutput

__all__ = ["PARAM_CHECKS", "LossSpec", "RunningMean", "check_params", "lookup"]


@dataclass(frozen=True)
class LossSpec:
    """A registered objective and the facts the training loop needs about it."""

    fn: Callable[..., LossOutput | UnpairedOutput | ListwiseOutput]
    """The objective: a pure function of log-probs; what it returns depends on the registry it is in."""
    needs_reference: bool
    """True when the objective uses reference log-probs (DPO); False for reference-free ones."""
    length_normalised: bool = False
    """True when the objective compares per-token mean log-probs: `preference_loss` divides the policy (and
    reference) sums by the completion lengths before calling `fn`."""
    takes_lengths: bool = False
    """True when `fn` also receives `chosen_lengths` (to average an NLL term over the chosen tokens)."""
    params: tuple[str, ...] = ("beta",)
    """The config hyperparameters `fn` uses, by config field name; any other loss parameter the user sets
    is an error (see `check_params` and the training loop)."""
    inputs: tuple[str, ...] = ()
    """Other keyword inputs `fn` accepts: per-row data columns ('preference', 'margin') or state the loop
    keeps ('delta')."""
    paper: str = ""
    """Where the objective comes from."""

    @property
    def needs_lengths(self) -> bool:
        """True when completion token counts must be passed."""
        return self.length_normalised or self.takes_lengths


# Valid values of each config hyperparameter: (test, what is expected).
PARAM_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: v > 0, "a number > 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "a label-flip probability in [0, 0.5)"),
    "gamma": (lambda v: True, "a finite number"),
    "nll_weight": (lambda v: v >= 0, "a number >= 0"),
    "desirable_weight": (lambda v: v >= 0, "a number >= 0"),
    "undesirable_weight": (lambda v: v >= 0, "a number >= 0"),
}


def lookup(name: str, registry: dict[str, LossSpec], what: str) -> LossSpec:
    """`registry[name]`; a clear error naming the closest valid name and listing them all otherwise."""
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown {what} '{name}'.{hint} Valid: {', '.join(sorted(registry))}")
    return registry[name]


def check_params(name: str, params: dict, registry: dict[str, LossSpec], what: str = "loss") -> None:
    """Raise a ValueError if `params` holds a hyperparameter loss `name` (in `registry`; `what` names the
    registry in the error for an unknown `name`) does not use, or a bad value.

    `alignkit.losses.check_params` is this with the paired `LOSSES` as the default registry.
    """
    spec = lookup(name, registry, what)
    for key, value in params.items():
        if key not in spec.params:
            raise ValueError(
                f"loss '{name}' does not use '{key}' (its parameters: {', '.join(spec.params)}); "
                "see docs/objectives.md"
            )
        test, expected = PARAM_CHECKS[key]
        valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not (valid and test(value)):
            raise ValueError(f"loss '{name}': {key}={value!r} is not valid (expected {expected})")


class RunningMean:
    """The mean of every value seen so far (BCO's reward shift δ), exact across checkpoints.

    `state_dict()` / `load_state_dict()` let the training loop save it in a checkpoint, so a resumed run uses
    the same δ the uninterrupted run used.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        """Fold in a batch of values (any shape)."""
        n = values.numel()
        if n:
            self.count += n
            self.mean += (float(values.detach().double().mean()) - self.mean) * n / self.count

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
