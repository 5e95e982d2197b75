"""Importance weights for a rollout drawn by a sampler that is not the trainer, and how far apart the two are.

The clipped surrogate (`losses.policy_losses.clipped_surrogate`) takes its ratio π_θ / π_old against the trainer's
own log-probs of the rollout, π_old. When another engine drew the tokens (vLLM: other kernels, other
precision; a guide policy mixed in, `generation.guided`), they are samples of π_sampler, not of π_old, and the policy gradient is
off-policy by π_old / π_sampler. `sampler_weights` is the correction a training loop multiplies each
token's policy loss by; `sampler_statistics` the figures it logs (under `sampler/`):

    weights, ratios = sampler_weights(old_logps, sampler_logps, mask, mode="sequence_mask", cap=3.0)
    per_token, metrics = clipped_surrogate(logps, old_logps, adv, mask)
    per_token = per_token * weights                # the policy term only: not a KL term, not a value loss
    stats = sampler_statistics(gather(log_ratios), gather(ratios), mode=..., cap=...)

Where a guide drew the rollout (`generation.guided`: tokens from q = α·π + (1 − α)·g), the weights π_old / q are
far from 1, and the baseline a group (or PPO's whitening) subtracts is the mean reward of q's samples, not of
π's. That baseline costs nothing in expectation (Σ_y π(y) ∇log π(y) = 0), but in every batch its term
b·Σ_t w_t ∇log π(y_t) no longer cancels as Σ_t A_t = 0 makes it cancel on-policy: it pushes the logits of
every token the batch did not draw one way (∇ of the softmax's normaliser), and Adam, which scales each
coordinate by its own running magnitude, turns that small, systematic push into a full step for each of
them. With a guide that knows the reward, q's mean is above π's and the push is away from the guide's
tokens: measured on the letter-count task, a tiny policy lost reward under a guide that gained it reward
without the correction. `importance_weighted_means` gives the baseline the correction needs instead, the
self-normalised importance estimate of π's own mean, Σ_j W_j R_j / Σ_j W_j: the advantages centred on
it have Σ_j W_j A_j = 0, as on-policy advantages have Σ_j A_j = 0.

Pure functions of tensors, as `losses.policy`; the conventions are its own ((N, T) per-token tensors with a
(N, T) completion mask; metrics are detached 0-dim tensors).
"""

from __future__ import annotations

import torch

__all__ = ["SAMPLER_WEIGHTINGS", "importance_weighted_means", "sampler_statistics", "sampler_weights"]

# What `sampler_weights` computes; config.online.SAMPLER_CORRECTIONS adds auto and none (tests/test_config.py).
SAMPLER_WEIGHTINGS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _capped(ratios: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """Ratios -> weights: min(r, C) (``*_truncate``) or r where r <= C, else 0 (``*_mask``)."""
    if mode.endswith("_truncate"):
        return ratios.clamp(max=cap)
    return torch.where(ratios <= cap, ratios, torch.zeros_like(ratios))


def sampler_weights(
    old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, *, mode: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for tokens drawn by a sampler that is not the trainer: truncated importance
    sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").

    The rollout's tokens come from π_sampler (vLLM: other kernels, other precision), while the clipped
    surrogate's ratio is taken against π_old, the trainer's own recomputation at the same weights. Each
    token's policy loss times w ≈ π_old / π_sampler makes the update an expectation under π_old again; the
    cap C bounds the variance (from above only: a small ratio keeps its small weight). With
    Δ_t = log π_old(y_t) − log π_sampler(y_t) on a completion's tokens (mask 1):

        token_truncate     w_t = min(exp(Δ_t), C)                              (TIS; OpenRLHF's tis)
        token_mask         w_t = exp(Δ_t) if exp(Δ_t) <= C, else 0             (OpenRLHF's icepop)
        sequence_truncate  w_t = min(exp(Σ_s Δ_s), C), one weight for all of the completion's tokens
        sequence_mask      w_t = exp(Σ_s Δ_s) if it is <= C, else 0            (TRL's default, C = 3)

    These are TRL's four vllm_importance_sampling_mode values with its upper bound alone. OpenRLHF's tis
    and icepop take a lower bound too; its seq-mask-tis (drop a completion whose *geometric mean* ratio
    leaves the bounds, weight the rest per token) is not one of them.

    old_logps, sampler_logps, mask: (N, T). Returns (weights, ratios), detached: weights (N, T), 0 where
    mask is 0 (nothing off the completions, non-finite padding included, reaches the loss); ratios, the
    uncapped ratios of the units the cap acts on: (M,) for the M = Σ mask completion tokens in row-major
    order (token_*), or (N,) for the completions (sequence_*; one without tokens has ratio 1), for
    `sampler_statistics`.
    """
    if mode not in SAMPLER_WEIGHTINGS:
        raise ValueError(f"unknown sampler weighting '{mode}'. Valid: {', '.join(SAMPLER_WEIGHTINGS)}")
    if not cap > 0:
        raise ValueError(f"sampler_weights: cap={cap!r} must be > 0 (TRL uses 3)")
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logps.detach() - sampler_logps.detach(), torch.zeros_like(old_logps))
    if mode.startswith("token_"):
        ratios = torch.exp(log_ratio)  # (N, T)
        weights = _capped(ratios, mode, cap)
        return torch.where(mask, weights, torch.zeros_like(weights)), ratios[mask]
    ratios = torch.exp(log_ratio.sum(-1))  # (N,): π_old(y|x) / π_sampler(y|x)
    weights = _capped(ratios, mode, cap).unsqueeze(-1).expand_as(log_ratio)  # (N, T)
    return torch.where(mask, weights, torch.zeros_like(weights)), ratios


def sampler_statistics(
    log_ratios: torch.Tensor, ratios: torch.Tensor | None = None, *, mode: str = "none", cap: float = 3.0
) -> dict[str, torch.Tensor]:
    """How far the sampler is from the trainer, and what the correction did: detached 0-dim tensors.

    log_ratios: (M,) Δ_t = log π_old(y_t) − log π_sampler(y_t) of every completion token; ratios: (U,)
    from `sampler_weights` with the same `mode` and `cap`, or None (no correction). Gather both over
    processes first: the figures are then the whole step's.

        logp_diff/mean, logp_diff/max   mean and max of |Δ_t| over the tokens
        kl                              mean of exp(Δ_t) − 1 − Δ_t: Schulman's k3 estimate of
                                        KL(π_sampler ‖ π_old) per token (the tokens are π_sampler's
                                        samples; unbiased and >= 0, where k1 = −Δ_t can go negative)
        weights/mean, /min, /max        of the capped weights, one per unit (token or completion)
        frac_truncated | frac_masked    the share of units whose ratio exceeds C (*_truncate | *_mask)
    """
    zero = log_ratios.new_zeros(())
    gap = log_ratios.detach().abs()
    out = {
        "logp_diff/mean": gap.mean() if gap.numel() else zero,
        "logp_diff/max": gap.max() if gap.numel() else zero,
        "kl": (torch.expm1(log_ratios) - log_ratios).mean().detach() if gap.numel() else zero,
    }
    if ratios is not None and ratios.numel():
        if mode not in SAMPLER_WEIGHTINGS:
            raise ValueError(f"unknown sampler weighting '{mode}'. Valid: {', '.join(SAMPLER_WEIGHTINGS)}")
        weights = _capped(ratios.detach(), mode, cap)
        out.update(
            {"weights/mean": weights.mean(), "weights/min": weights.min(), "weights/max": weights.max()}
        )
        capped = "frac_truncated" if mode.endswith("_truncate") else "frac_masked"
        out[capped] = (ratios.detach() > cap).float().mean()
    return out


def importance_weighted_means(values: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N / group_size,) the importance-weighted mean of each group of `group_size` consecutive values,
    Σ_j W_j v_j / Σ_j W_j, and 0 for a group whose weights sum to 0 (every unit masked).

    values, weights: (N,), weights >= 0 (e.g. each completion's mean token weight π_old / q). Subtracting a
    group's mean from its advantages (`A_i - m`) gives Σ_j W_j (A_j - m) = 0: the baseline becomes the
    self-normalised importance estimate of the policy's own mean (module docstring) instead of the sampler's.
    With equal weights it is the plain mean, so advantages that already have mean 0 are left as they are.
    """
    if values.shape != weights.shape or values.dim() != 1 or values.numel() % group_size:
        raise ValueError(
            f"importance_weighted_means: values {tuple(values.shape)} and weights {tuple(weights.shape)} must be "
            f"one (N,) shape with N a multiple of group_size={group_size}"
        )
    v, w = values.view(-1, group_size), weights.view(-1, group_size).to(values.dtype)  # (N / G, G)
    total = w.sum(-1)
    return torch.where(total > 0, (w * v).sum(-1) / total.clamp(min=torch.finfo(v.dtype).tiny), 0.0)
