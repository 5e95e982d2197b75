"""LUFFY's policy shaping: the objective of a guide's whole completions in a GRPO group (Yan et al. 2025,
"Learning to Reason under Off-Policy Guidance", arXiv:2504.14945; guide.mode=traces, docs/online_rl.md).

Mixed-policy GRPO puts k completions of a guide π_φ beside the G − k of the policy in each prompt's group;
the group's advantages are taken over all G rewards, the guide's included (the paper's Â over G_on ∪ G_off:
`losses.policy.compute_advantages` on the whole group, nothing to change). Its objective, J_Mixed, is the
clipped surrogate on every token with the ratio r_t = π_θ / π_θold on the policy's completions and
r̂_t = π_θ / π_φ on the guide's, summed over all tokens and divided by their number Z. The paper then sets
π_φ = 1 (the guide's token probabilities are not needed, nor its tokenizer), drops the clip on the
off-policy part, and replaces that part's ratio by f (section "Policy shaping via regularized importance
sampling"):

    J_shaping(θ) = 1/Z [ Σ_{j∈off} Σ_t f(π_θ(τ_j,t)) Â_j  +  Σ_{i∈on} Σ_t CLIP(r_i,t(θ), Â_i, ε) ]
    f(x) = x / (x + γ),   γ = 0.1,   Z = Σ_{j∈off} |τ_j| + Σ_{i∈on} |τ_i|

`shaped_guide_loss` is the off-policy part, per token, as a loss: −f(π_θ(y_t))·Â, with no clip and no
ratio to π_old (the guide's tokens were never π_old's samples); the on-policy part is the registered policy
loss on the policy's own tokens (`losses.policy_losses`), and the 1/Z is `losses.policy.aggregate`'s
token_mean. Why f: the term's gradient is Â·f'(π)·∇π = Â·f'(π)·π·∇log π(y_t), with

    f'(π) = γ / (π + γ)²       (1/γ = 10 at π → 0, γ/(1 + γ)² ≈ 0.083 at π = 1)

against Â·π·∇log π for the bare π_θ (f = identity): a guide token the policy finds unlikely, the one that
carries what it does not know yet, keeps a gradient up to 1/γ times larger, and a token it already agrees
with is damped, so the policy does not just sharpen onto the guide's easy tokens (the paper's entropy
collapse). Plain importance weights π/g would weight the guide's tokens by a ratio ≪ 1, and teach almost
nothing.

Pure functions of tensors, with the conventions of `losses.policy_losses` ((B, T) per-token tensors, a (B, T)
mask; metrics are detached 0-dim tensors).
"""

from __future__ import annotations

import torch

__all__ = ["shaped_guide_loss", "shaping", "shaping_grad_weight", "shaping_statistics"]


def shaping(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """f(π) = π / (π + γ), elementwise: LUFFY's regularised importance weight, in [0, 1 / (1 + γ)]."""
    return probs / (probs + gamma)


def shaping_grad_weight(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """f'(π) = γ / (π + γ)², elementwise: what the shaping multiplies ∇π by on a guide token (the bare π_θ,
    f = identity, has 1 everywhere)."""
    return gamma / (probs + gamma) ** 2


def shaped_guide_loss(
    logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, gamma: float = 0.1
) -> torch.Tensor:
    """LUFFY's shaped off-policy term on the guide's tokens, per token, as a loss (module docstring):

        loss_t = −f(π_θ(y_t))·Â,   f(x) = x / (x + γ)     gradient −Â·γ·π / (π + γ)²·∇log π(y_t)

    logps: (B, T) the policy's log-probs of the guide's tokens (with gradient), under the distribution it
    samples from (tempered, truncated: as its own tokens are scored); advantages: (B,) one per completion, or
    (B, T); mask: (B, T), 1 on the guide's tokens that count. Nothing is clipped: f < 1 / (1 + γ) bounds the
    term, and there is no π_old to clip a ratio to. Returns the (B, T) per-token loss, 0 off the mask (a
    non-finite log-prob there leaks neither into the loss nor into its gradient). Its figures are
    `shaping_statistics`', taken once per rollout."""
    if not gamma > 0:
        raise ValueError(f"shaped_guide_loss: gamma={gamma!r} must be > 0 (LUFFY: 0.1)")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    advantages = advantages.to(logps.dtype).detach()
    mask = mask.bool()
    zeros = torch.zeros_like(logps)
    probs = torch.where(mask, logps, zeros).exp()  # (B, T) π_θ(y_t); exp(0) = 1 off the mask, never inf
    return torch.where(mask, -shaping(probs, gamma) * advantages, zeros)


def shaping_statistics(logps: torch.Tensor, *, gamma: float) -> dict[str, torch.Tensor]:
    """What the shaping does to a rollout's guide tokens: detached 0-dim tensors from logps (M,), the policy's
    log-probs of the M guide tokens (gather them over processes first: the figures are then the step's).

        prob/mean                       mean π_θ(y_t) on the guide's tokens
        shaping_weight/mean, /min, /max of f'(π) = γ / (π + γ)²
        frac_amplified                  the share of tokens with f'(π) > 1, i.e. π < √γ − γ (0.216 at
                                        γ = 0.1): those whose gradient the shaping raises above the bare
                                        π_θ's
    """
    if logps.numel() == 0:
        zero = logps.new_zeros(())
        return {k: zero for k in ("prob/mean", "shaping_weight/mean", "shaping_weight/min",
                                  "shaping_weight/max", "frac_amplified")}  # fmt: skip
    probs = logps.detach().exp()
    weights = shaping_grad_weight(probs, gamma)
    return {
        "prob/mean": probs.mean(),
        "shaping_weight/mean": weights.mean(),
        "shaping_weight/min": weights.min(),
        "shaping_weight/max": weights.max(),
        "frac_amplified": (weights > 1).float().mean(),
    }
