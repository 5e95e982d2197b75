"""Paired preference objectives: pure functions of per-sequence log-probs.

Each objective takes per-sequence log-prob sums of the chosen (y_w) and rejected (y_l) completions, shape
(B,), under the policy and, when it needs one, the reference model, and returns a `LossOutput`. Registering
an objective is one entry in `LOSSES`, which also states what the training loop must provide. The
equations, papers and when to choose each objective are in docs/objectives.md.

Notation used in the docstrings: for a completion y, the log-ratio is log πθ(y|x) − log πref(y|x), and

    h = (log πθ(y_w|x) − log πref(y_w|x)) − (log πθ(y_l|x) − log πref(y_l|x))

is the difference of log-ratios (the implicit reward margin divided by β). ℓ(z) = −log σ(z) = log(1 + e^−z).
Reference-free objectives (SimPO, CPO, ORPO) use the policy log-probs alone; |y| is a token count.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from alignkit.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from alignkit.losses.registry import LossSpec, lookup
from alignkit.losses.registry import check_params as check_in_registry
from alignkit.losses.types import LossOutput

__all__ = ["GPO_CONVEX", "LOSSES", "check_params", "get_loss", "preference_loss"]


# ---------------------------------------------------------------------------------------------
# objectives that need a reference


def _log_ratios(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps  # (B,), (B,)


def sigmoid_dpo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    preference: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> LossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7), with conservative and soft labels and per-row margins.

    With p = P(chosen is really better) (per row `preference`, default 1), label smoothing ε (cDPO: the label
    is flipped with probability ε), the effective label p' = (1−ε)·p + ε·(1−p), and the logit
    z = β·h − m with m the per-row `margin` (default 0):

        loss = −( p'·log σ(z) + (1 − p')·log σ(−z) ).

    p = 1, ε = 0, m = 0 is the original DPO loss; p = 0.5 has zero gradient with respect to h at z = 0 and
    pulls z back towards 0 elsewhere. A margin m > 0 is reward-shaped DPO (ODPO, Amini et al. 2024):
    −log σ(β·h − m), the implicit reward margin must exceed m (in reward units, like β·h) before the loss
    flattens. All inputs (B,).
    """
    chosen_ratio, rejected_ratio = _log_ratios(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = chosen_ratio - rejected_ratio
    z = beta * h if margin is None else beta * h - margin.to(h.dtype)
    p = torch.ones_like(h) if preference is None else preference.to(h.dtype)
    p = (1.0 - label_smoothing) * p + label_smoothing * (1.0 - p)
    losses = -(p * F.logsigmoid(z) + (1.0 - p) * F.logsigmoid(-z))
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def robust_dpo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024): unbiased under labels flipped with probability ε.

        loss = [ (1 − ε)·ℓ(β·h) − ε·ℓ(−β·h) ] / (1 − 2ε),    ε = `label_smoothing` in [0, 0.5)

    Its expectation over the label noise is the clean DPO loss (cDPO's is not); ε = 0 is plain DPO.
    The per-row loss can be negative. All inputs (B,).
    """
    eps = label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust: label_smoothing (the label-flip rate ε) must be in [0, 0.5), got {eps}")
    chosen_ratio, rejected_ratio = _log_ratios(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = beta * (chosen_ratio - rejected_ratio)
    losses = ((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)  # softplus(−z) = ℓ(z)
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17): loss = (h − 1/(2β))², with β the paper's τ.

    Registered as length-normalised: the log-probs here are per-token means (sum / completion length, for
    the policy and the reference alike), as TRL does, so h is a difference of per-token log-ratios and the
    target 1/(2β) does not depend on completion length. Squared, not saturating: h is pulled to the target
    from both sides, which is IPO's guard against DPO's over-fitting on deterministic preferences.
    All inputs (B,).
    """
    chosen_ratio, rejected_ratio = _log_ratios(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


# GPO (Tang et al. 2024): offline preference optimisation as E[f(β·ρ)] with ρ = h and f convex.
GPO_CONVEX: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "logistic": lambda x: F.softplus(-x),  # log(1 + e^−x): DPO
    "hinge": lambda x: torch.relu(1.0 - x),  # max(0, 1 − x): SLiC
    "squared": lambda x: (x - 1.0) ** 2,  # (x − 1)²: IPO-style
    "exponential": lambda x: torch.exp(-x),  # e^−x
    "truncated_quadratic": lambda x: torch.relu(1.0 - x) ** 2,  # max(0, 1 − x)²
    "savage": lambda x: torch.sigmoid(-x) ** 2,  # 1 / (1 + e^x)²
}


def gpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    convex: str,
    beta: float = 0.1,
) -> LossOutput:
    """Generalized Preference Optimization (Tang et al. 2024): loss = f(β·h), f = GPO_CONVEX[convex].

    Every f is convex, decreasing near 0 (f'(0) < 0), so each member raises h. `convex` is bound at
    registration (gpo_logistic, gpo_hinge, ...). All inputs (B,).
    """
    chosen_ratio, rejected_ratio = _log_ratios(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = GPO_CONVEX[convex](beta * (chosen_ratio - rejected_ratio))
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def bco_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    delta: float,
    beta: float = 0.1,
) -> LossOutput:
    """BCO on paired data (Jung et al. 2024): a binary classifier on implicit rewards r = β·log-ratio.

        loss = −log σ(r_w − δ) − log σ(−(r_l − δ))

    Chosen completions are the positive class, rejected the negative; δ is the reward shift, the running
    mean of the implicit rewards of both classes. It is loop state, not a hyperparameter: the training loop
    keeps a `RunningMean` of the rewards of all previous training batches and passes its `mean` (0 at the
    start, when policy = reference). All inputs (B,).
    """
    chosen_ratio, rejected_ratio = _log_ratios(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), {"delta": float(delta)})


def rpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> LossOutput:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): DPO plus NLL on chosen.

        loss = ℓ(β·h) + α·(−log πθ(y_w|x) / |y_w|),    α = `nll_weight`

    The NLL is the chosen completion's per-token mean, as in the paper. All inputs (B,).
    """
    out = sigmoid_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta)
    nll = -chosen_logps / chosen_lengths.clamp(min=1)
    out.losses = out.losses + nll_weight * nll
    out.metrics["nll"] = float(nll.detach().mean())
    return out


# ---------------------------------------------------------------------------------------------
# the registry

LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(
        sigmoid_dpo,
        needs_reference=True,
        params=("beta", "label_smoothing"),
        inputs=("preference", "margin"),
        paper="Rafailov et al. 2023 (DPO); cDPO; Amini et al. 2024 (ODPO margins)",
    ),
    "robust": LossSpec(
        robust_dpo,
        needs_reference=True,
        params=("beta", "label_smoothing"),
        paper="Chowdhury et al. 2024 (rDPO)",
    ),
    "hinge": LossSpec(
        partial(gpo_loss, convex="hinge"), needs_reference=True, paper="Zhao et al. 2023 (SLiC-HF)"
    ),
    "ipo": LossSpec(ipo_loss, needs_reference=True, length_normalised=True, paper="Azar et al. 2023 (IPO)"),
    **{
        f"gpo_{name}": LossSpec(
            partial(gpo_loss, convex=name), needs_reference=True, paper=f"Tang et al. 2024 (GPO, {name})"
        )
        for name in GPO_CONVEX
    },
    "bco_pair": LossSpec(
        bco_pair_loss, needs_reference=True, inputs=("delta",), paper="Jung et al. 2024 (BCO, paired)"
    ),
    "rpo": LossSpec(
        rpo_loss,
        needs_reference=True,
        takes_lengths=True,
        params=("beta", "nll_weight"),
        paper="Pang et al. 2024 (RPO / iterative RPO)",
    ),
    "simpo": LossSpec(
        simpo_loss,
        needs_reference=False,
        length_normalised=True,
        params=("beta", "gamma"),
        paper="Meng et al. 2024 (SimPO)",
    ),
    "cpo": LossSpec(
        cpo_loss,
        needs_reference=False,
        takes_lengths=True,
        params=("beta", "nll_weight"),
        paper="Xu et al. 2024 (CPO)",
    ),
    "orpo": LossSpec(
        orpo_loss, needs_reference=False, length_normalised=True, paper="Hong et al. 2024 (ORPO)"
    ),
}


def get_loss(name: str) -> LossSpec:
    """The registered paired objective called `name`; a clear error listing the valid names otherwise."""
    return lookup(name, LOSSES, "preference loss")


def check_params(name: str, params: dict, registry: dict[str, LossSpec] | None = None) -> None:
    """Raise a ValueError if `params` holds a hyperparameter loss `name` (in `registry`, default the
    paired `LOSSES`) does not use, or a bad value.

    The default is given here rather than in `registry.check_params`, which would have to import this
    module, and this module imports it.
    """
    if registry is None:
        check_in_registry(name, params, LOSSES, "preference loss")
    else:
        check_in_registry(name, params, registry)


def _required_inputs(spec: LossSpec) -> list[str]:
    """Keyword inputs of `spec.fn` that have no default (e.g. bco_pair's delta)."""
    parameters = inspect.signature(spec.fn).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is p.empty]


def preference_loss(
    name: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    *,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    **params,
) -> LossOutput:
    """Compute the registered paired objective `name` on per-sequence log-prob sums (shape (B,)).

    `params` are the objective's hyperparameters (`LossSpec.params`, e.g. beta) and inputs
    (`LossSpec.inputs`, e.g. a per-row `margin`). Lengths (completion token counts, (B,)) are required by
    length-normalised objectives and those with an NLL term; reference log-probs by objectives that need a
    reference (reference-free ones ignore them). A missing input, an unknown or unused parameter, or a bad
    value raises a ValueError naming it.
    """
    spec = get_loss(name)
    unknown = [k for k in params if k not in spec.params and k not in spec.inputs]
    if unknown:
        takes = ", ".join(spec.params + spec.inputs)
        raise ValueError(f"loss '{name}' does not use {', '.join(map(repr, unknown))} (it takes: {takes})")
    check_params(name, {k: v for k, v in params.items() if k in spec.params})
    if spec.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss '{name}' needs completion lengths: pass chosen_lengths and rejected_lengths (token counts)"
        )
    if spec.takes_lengths:
        params["chosen_lengths"] = chosen_lengths
    missing = [k for k in _required_inputs(spec) if params.get(k) is None]
    if missing:
        raise ValueError(f"loss '{name}' needs {', '.join(missing)}: pass it (see the loss's docstring)")
    if spec.length_normalised:
        chosen_n, rejected_n = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
        chosen_logps, rejected_logps = chosen_logps / chosen_n, rejected_logps / rejected_n
        if spec.needs_reference and ref_chosen_logps is not None and ref_rejected_logps is not None:
            ref_chosen_logps, ref_rejected_logps = (
                ref_chosen_logps / chosen_n,
                ref_rejected_logps / rejected_n,
            )
    if not spec.needs_reference:
        return spec.fn(chosen_logps, rejected_logps, **params)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(
            f"loss '{name}' needs reference log-probs: pass ref_chosen_logps and ref_rejected_logps"
        )
    return spec.fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **params)
