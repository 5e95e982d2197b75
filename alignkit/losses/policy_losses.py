"""The policy term of online RL, per token, as a loss; and `POLICY_LOSSES`, the registry that
`algorithms/grpo.py` takes one from by name (GRPOConfig's `policy_loss`):

    grpo    PPO's clipped surrogate on each token's ratio (`clipped_surrogate`; also PPO's, algorithms/ppo.py)
    gspo    GSPO: one length-normalised ratio per completion, clipped per completion (`gspo_surrogate`)
    cispo   CISPO: each token's REINFORCE term weighted by its clipped, detached ratio (`cispo_surrogate`)

Every one is `fn(logps, old_logps, advantages, mask, *, epsilon, epsilon_high) -> (per_token_loss, metrics)`
with the conventions of `losses.policy`: logps, old_logps (B, T), the policy's log-probs of the sampled
tokens (with gradient) and those of the policy that sampled them (π_old; detached here); advantages (B,),
one per completion, broadcast over its tokens, or (B, T); mask (B, T), 1 on the tokens that count. The
per-token loss is 0 where mask is 0 (a non-finite log-prob on padding cannot leak in, its gradient
neither) and goes to `losses.policy.aggregate`; a sampler correction (`losses.off_policy`) multiplies it
token by token. Metrics are detached 0-dim means over the masked tokens: `clip_frac/low`,
`clip_frac/high`, `clip_frac` (their sum), `ratio/mean` (of the token ratios π/π_old) and `approx_kl`
(the mean of (ρ − 1) − log ρ, Schulman's k3 estimate of KL(π_old ‖ π) on samples of π_old).

At ratio 1 (the first update on a rollout: logps equal old_logps) all three have the same gradient, −A·∇log
π(y_t) per token, so with the same aggregation they train identically when each rollout gets one update;
they differ only where samples are reused (tests/test_gspo_cispo.py derives both by hand).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.losses.masks import masked_mean
from alignkit.losses.registry import lookup

__all__ = [
    "POLICY_LOSSES",
    "PolicyLossSpec",
    "cispo_surrogate",
    "clip_range",
    "clipped_surrogate",
    "get_policy_loss",
    "gspo_surrogate",
]


def clip_range(what: str, epsilon: float, epsilon_high: float | None, *, lower_bound: bool = True) -> float:
    """ε_high (`epsilon_high`, or ε_low = `epsilon` when None), after refusing a clip range that is not one:
    ε_high > 0, and ε_low in (0, 1) where the loss keeps a lower bound 1 − ε_low > 0 (`lower_bound`), else
    ε_low > 0. A ValueError starting with `what` otherwise."""
    if not 0 < epsilon < (1 if lower_bound else float("inf")):
        valid = "in (0, 1)" if lower_bound else "> 0"
        raise ValueError(f"{what}: epsilon={epsilon!r} must be {valid}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if eps_high <= 0:
        raise ValueError(f"{what}: epsilon_high={epsilon_high!r} must be > 0")
    return eps_high


def _per_token(advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, T) advantages -> detached, in logps' dtype, broadcastable over (B, T)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    return advantages.to(logps.dtype).detach()


def _metrics(
    log_ratio: torch.Tensor, mask: torch.Tensor, low: torch.Tensor, high: torch.Tensor, *, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The detached metrics every policy loss logs: `low` / `high` (B, T), or (B, 1) for one flag per
    completion, mark the clipped tokens; `dtype` is the log-probs' (the flags are averaged in it)."""
    with torch.no_grad():
        clip_low = masked_mean(low.expand_as(log_ratio).to(dtype), mask).detach()
        clip_high = masked_mean(high.expand_as(log_ratio).to(dtype), mask).detach()
        safe_log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
        return {
            "clip_frac/low": clip_low,
            "clip_frac/high": clip_high,
            "clip_frac": clip_low + clip_high,
            "approx_kl": masked_mean(torch.expm1(safe_log_ratio) - safe_log_ratio, mask).detach(),
            "ratio/mean": masked_mean(torch.exp(safe_log_ratio), mask).detach(),
        }


def _clipped(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, epsilon: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective on a (B, T) ratio, as a loss: −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A), 0
    off the mask; with the (B, T) flags of the tokens whose clip is active (A < 0 below the lower bound,
    A > 0 above the upper one: those have no gradient)."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high) * advantages
    per_token_loss = torch.where(mask, -torch.minimum(unclipped, clipped), torch.zeros_like(ratio))
    low = (advantages < 0) & (ratio < 1 - epsilon)
    high = (advantages > 0) & (ratio > 1 + epsilon_high)
    return per_token_loss, low, high


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, per token, as a loss (Schulman et al. 2017, eq. 7; GRPO's, Shao
    et al. 2024, eq. 3).

        ρ_t    = exp(log π(y_t) − log π_old(y_t))
        loss_t = −min(ρ_t·A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_t)

    ε_low = `epsilon`, in (0, 1); ε_high = `epsilon_high` when given (DAPO's "Clip-Higher", Yu et al.
    2025, §3.1: a larger upper bound lets low-probability tokens with A > 0 grow), else `epsilon`. Where
    the clipped term is the minimum the token has no gradient: that is the clip being active, which happens
    only for A > 0 with ρ > 1 + ε_high (`clip_frac/high`) or A < 0 with ρ < 1 − ε_low (`clip_frac/low`).

    Shapes and metrics: see the module docstring. Returns (per_token_loss (B, T), metrics).
    """
    eps_high = clip_range("clipped_surrogate", epsilon, epsilon_high)
    advantages = _per_token(advantages, logps)
    mask = mask.bool()

    log_ratio = logps - old_logps.detach()  # (B, T)
    ratio = torch.exp(log_ratio)
    per_token_loss, low, high = _clipped(ratio, advantages, mask, epsilon=epsilon, epsilon_high=eps_high)
    return per_token_loss, _metrics(log_ratio, mask, low, high, dtype=logps.dtype)


def gspo_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 3e-4,
    epsilon_high: float | None = 4e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's sequence-level clipped objective, in its token form GSPO-token, per token, as a loss (Zheng et
    al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, eqs. 5-7 and 13-14).

        log s_i = 1/|y_i| Σ_t (log π(y_t) − log π_old(y_t))     completion i's length-normalised ratio
        s_i,t   = sg[s_i] · π(y_t) / sg[π(y_t)]                  value s_i, gradient s_i·∇log π(y_t)
        loss_t  = −min(s_i,t·A_i,t, clip(s_i,t, 1 − ε_low, 1 + ε_high)·A_i,t)

    Every token of completion i carries s_i's value, so the clip decides per completion: where it is active
    (A > 0 with s_i > 1 + ε_high, A < 0 with s_i < 1 − ε_low) all of i's tokens lose their gradient,
    elsewhere token t's gradient is −A_i,t·s_i·∇log π(y_t). With one advantage per completion (A_i,t = A_i,
    GRPO's and RLOO's) and `sequence_mean` aggregation (1/|y_i| Σ_t, GSPO's own), the gradient of completion
    i's term is −A_i·s_i·1/|y_i| Σ_t ∇log π(y_t) = −A_i·∇s_i: exactly GSPO's sequence objective, eq. 5.
    ε is GSPO's own, two orders of magnitude below the token clip's since s_i is a geometric mean: the
    paper's 3e-4 / 4e-4 (§5.1) are the defaults. |y_i| counts the tokens mask marks, so a completion left
    out (mask all 0) has ratio 1 and no loss.

    A sampler correction (`losses.off_policy`) multiplies this per-token loss token by token, inside the
    sequence term: with `sequence_*` weights (one per completion) that scales completion i's whole term by
    its weight; with `token_*` weights it scales each token's gradient s_i·∇log π(y_t) by its own. The ratio
    s_i itself stays π/π_old, as the token clip's does. `clip_frac/*` are the shares of tokens in clipped
    completions (GSPO reports clipped tokens too, Fig. 2); `ratio/mean` and `approx_kl` are the token
    ratios', comparable across losses. Shapes: see the module docstring.
    """
    eps_high = clip_range("gspo_surrogate", epsilon, epsilon_high)
    advantages = _per_token(advantages, logps)
    mask = mask.bool()
    zeros = torch.zeros_like(logps)

    log_ratio = torch.where(mask, logps - old_logps.detach(), zeros)  # (B, T), 0 off the mask
    lengths = mask.sum(-1).clamp(min=1)  # (B,) |y_i|
    log_s = (log_ratio.sum(-1) / lengths).unsqueeze(-1)  # (B, 1) log s_i
    own = torch.where(mask, logps - logps.detach(), zeros)  # (B, T) value 0, gradient ∇log π(y_t)
    s = torch.exp(log_s.detach() + own)  # (B, T) s_i,t, whose value is s_i on every token
    per_token_loss, low, high = _clipped(s, advantages, mask, epsilon=epsilon, epsilon_high=eps_high)
    return per_token_loss, _metrics(log_ratio, mask, low, high, dtype=logps.dtype)


def cispo_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 1.0,
    epsilon_high: float | None = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: each token's REINFORCE term weighted by its clipped importance ratio, detached, as a loss
    (MiniMax-M1, 2025, "Scaling Test-Time Compute Efficiently with Lightning Attention", arXiv:2506.13585,
    eqs. 4-5).

        ρ_t    = exp(log π(y_t) − log π_old(y_t))
        w_t    = sg[clip(ρ_t, 1 − ε_low, 1 + ε_high)]
        loss_t = −w_t·A_t·log π(y_t)                 gradient −w_t·A_t·∇log π(y_t)

    Unlike the clipped surrogate no token loses its gradient: the clip bounds the weight, never the update
    (so a rare token whose ratio grew keeps learning, the paper's point). ε_low = `epsilon` > 0 (at 1 or
    above, no lower bound: ratios are positive; the paper sets no lower bound, and the default 1.0 is that);
    ε_high = `epsilon_high` (None: `epsilon`), default 5.0, a weight of at most 6 (the paper's additive
    convention, as NeMo RL's ratio_clip_max=5; TRL's `epsilon_high=5.0` for CISPO is the cap itself, our
    ε_high = 4). The loss's value is that of the REINFORCE term, not comparable with the surrogates'
    (−A at ratio 1); its gradient is. `clip_frac/low|high`: the shares of tokens whose weight was
    truncated (ρ < 1 − ε_low, ρ > 1 + ε_high), whatever the sign of A. Shapes: see the module docstring.
    """
    eps_high = clip_range("cispo_surrogate", epsilon, epsilon_high, lower_bound=False)
    advantages = _per_token(advantages, logps)
    mask = mask.bool()
    zeros = torch.zeros_like(logps)

    log_ratio = logps - old_logps.detach()  # (B, T)
    ratio = torch.exp(log_ratio.detach())
    weight = ratio.clamp(1 - epsilon, 1 + eps_high)  # (B, T), detached
    safe_logps = torch.where(mask, logps, zeros)
    per_token_loss = torch.where(mask, -weight * advantages * safe_logps, zeros)

    low, high = ratio < 1 - epsilon, ratio > 1 + eps_high
    return per_token_loss, _metrics(log_ratio, mask, low, high, dtype=logps.dtype)


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registered policy loss and the defaults its paper trains it with (the training config's `epsilon`,
    `epsilon_high`, `loss_aggregation` and `beta` when the user leaves them unset)."""

    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    """`fn(logps, old_logps, advantages, mask, *, epsilon, epsilon_high)` -> (per-token loss (B, T), metrics)."""
    epsilon: float
    """Default ε_low."""
    epsilon_high: float | None
    """Default ε_high; None = ε_low (a symmetric clip)."""
    default_aggregation: str | None
    """Its paper's loss aggregation (one of `losses.policy.AGGREGATIONS`); None = the advantage
    estimator's own (`AdvantageSpec.default_aggregation`)."""
    beta: float
    """Default weight of the KL to the reference (0 = its recipe holds no reference)."""
    paper: str
    """Where it comes from."""
    lower_bound: bool = True
    """Whether ε_low must leave a lower bound 1 − ε_low > 0 (`clip_range`'s check, as `fn` makes it)."""


# Its names are what GRPOConfig's `policy_loss` accepts (config.online.POLICY_LOSS_NAMES;
# tests/test_config.py checks).
POLICY_LOSSES: dict[str, PolicyLossSpec] = {
    # GRPO's objective (eq. 3): PPO's token clip, ε 0.2 both ways, β 0.04 with a k3 loss term (eq. 4); the
    # aggregation and KL placement are the advantage estimator's (grpo: sequence_mean, dr_grpo: constant ...).
    "grpo": PolicyLossSpec(
        clipped_surrogate, 0.2, None, None, 0.04, "Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)"
    ),
    # GSPO (§5.1): ε 3e-4 / 4e-4 on the sequence ratio, no KL term (its authors: verl PR #2775, as TRL's
    # GSPO recipe), 1/G Σ_i of the sequence term, i.e. the token form averaged per completion.
    "gspo": PolicyLossSpec(
        gspo_surrogate,
        3e-4,
        4e-4,
        "sequence_mean",
        0.0,
        "Zheng et al. 2025, Group Sequence Policy Optimization (arXiv:2507.18071)",
    ),
    # CISPO (eq. 4): no lower bound on the weight, ε_high 5, normalised by the total number of tokens of
    # the batch (token_mean), and no KL term in MiniMax-M1's objective.
    "cispo": PolicyLossSpec(
        cispo_surrogate,
        1.0,
        5.0,
        "token_mean",
        0.0,
        "MiniMax 2025, MiniMax-M1 (arXiv:2506.13585)",
        lower_bound=False,
    ),
}


def get_policy_loss(name: str) -> PolicyLossSpec:
    """`POLICY_LOSSES[name]`; a ValueError naming the closest valid name and listing them all otherwise."""
    return lookup(name, POLICY_LOSSES, "policy loss")  # type: ignore[arg-type]
