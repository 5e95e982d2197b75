"""The maths only an actor-critic needs: per-token KL-penalised rewards, GAE, whitening, the clipped value
loss, explained variance, and the KL coefficient controllers. Pure functions of tensors (and two small
state objects), called by `algorithms/ppo.py` in the order of a PPO step (Ziegler et al. 2019; Ouyang et
al. 2022; the "N implementation details of RLHF with PPO", Huang et al. 2024):

    rewards = kl_penalised_rewards(scores, logps_old, ref_logps, mask, kl_coef=ctl.value)   # (B, T)
    adv, returns = gae(rewards, values_old, mask, gamma=1.0, lam=0.95)                        # (B, T)
    adv = whiten(adv, mask)
    ... clipped surrogate (losses.policy) + vf_coef * clipped_value_loss(values, values_old, returns, mask)
    ctl.update(mean KL per sequence, n_sequences)

Per-token tensors are (B, T) with a `mask` (B, T), 1 on completion tokens and 0 on prompt and padding, the
completion tokens of a row contiguous. Position t of `values` is V(s_t), the value of the state in which
completion token t is chosen (read from the hidden state that predicts token t). Metrics are detached
0-dim tensors."""

from __future__ import annotations

import torch

from alignkit.losses.masks import masked_mean, masked_var

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "clipped_value_loss",
    "explained_variance",
    "fill_unscored",
    "gae",
    "kl_penalised_rewards",
    "last_token_index",
]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last masked position (-1 for a row with none). mask: (B, T)."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def fill_unscored(scores: torch.Tensor, gather=None) -> torch.Tensor:
    """`scores` (B,) with each NaN (a completion no reward source scored) replaced by the mean of every
    process's scored ones (`gather`: (B,) -> every process's, in rank order; 0 where none is scored), so that
    its score says nothing relative to the batch while its per-token KL penalty stays (`algorithms.ppo.
    shape_rewards` says why PPO does this rather than masking the completion out)."""
    every = gather(scores) if gather is not None else scores  # (every process: a collective, always called)
    scored = every[~every.isnan()]
    fill = scored.mean() if scored.numel() else scores.new_zeros(())
    return torch.where(scores.isnan(), fill, scores)


def kl_penalised_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token reward PPO optimises in RLHF (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2):

        r_t = −β · (log π_old(y_t) − log π_ref(y_t))  +  [t = last completion token] · score

    β = `kl_coef`; the KL term is k1 on the sampled tokens, a reward (no gradient flows through it), so
    summed over a completion it is an unbiased estimate of KL(π_old ‖ π_ref) for that prompt. The
    sequence-level `score` (B,) from the reward model is paid on the last completion token.
    scores: (B,); logps, ref_logps, mask: (B, T); ref_logps None = no reference (β plays no part).
    Returns (rewards (B, T), 0 off the mask; kl (B, T), the per-token k1, 0 off the mask).
    """
    mask_f = mask.to(logps.dtype)
    kl = (logps - ref_logps) * mask_f if ref_logps is not None else torch.zeros_like(logps)
    rewards = -kl_coef * kl
    last = last_token_index(mask)  # (B,)
    rows = torch.nonzero(last >= 0, as_tuple=True)[0]
    rewards = rewards.index_put(
        (rows, last[rows]), rewards[rows, last[rows]] + scores[rows].to(rewards.dtype)
    )
    return rewards.detach(), kl.detach()


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each row's completion tokens.

        δ_t = r_t + γ·V_{t+1} − V_t          (V after the last completion token is 0: the episode ends)
        A_t = δ_t + γλ·A_{t+1}               (A after the last completion token is 0)
        R_t = A_t + V_t                      (the value target, the λ-return)

    rewards, values, mask: (B, T), the completion tokens of a row contiguous; positions off the mask are
    ignored and come back 0. γ = 1 and λ = 0.95 are the RLHF defaults (Huang et al. 2024). Returns
    (advantages, returns), both (B, T), detached.
    """
    rewards, values = rewards.detach().float(), values.detach().float()
    m = mask.to(rewards.dtype)
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        # next_* are 0 unless position t + 1 is still in the completion
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m[:, t]
        next_value = values[:, t] * m[:, t]
        next_advantage = advantages[:, t]
    returns = (advantages + values) * m
    return advantages, returns


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's value loss with value clipping (Schulman et al. 2017's baselines code; Huang et al. 2024):

        V_clip = V_old + clip(V − V_old, −c, c)
        loss_t = ½ · max((V − R)², (V_clip − R)²)

    c = `cliprange_value`; None or 0 gives the plain ½(V − R)². values: (B, T) with gradient; old_values
    (the critic when the rollout was taken), returns: (B, T). Returns (per-token loss (B, T), 0 off the
    mask, for `losses.policy.aggregate`; metrics `value_clip_frac`, the fraction of tokens where the
    clipped term is the larger, and `value_error`, the mean squared error (V − R)²).
    """
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns).square()
    if cliprange_value:
        clipped_v = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
        clipped = (clipped_v - returns).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    else:
        per_token = 0.5 * unclipped
        clip_frac = torch.zeros((), device=values.device)
    per_token = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    metrics = {"value_clip_frac": clip_frac, "value_error": masked_mean(unclipped.detach(), mask)}
    return per_token, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over the masked tokens (CleanRL's diagnostic): 1 = the critic predicts the
    returns exactly, 0 = no better than their mean, < 0 = worse. NaN when the returns do not vary.
    (B, T), (B, T), (B, T) -> 0-dim, detached."""
    values, returns = values.detach().float(), returns.detach().float()
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """The adaptive KL coefficient of Ziegler et al. 2019 (§2.2), which steers the KL to a target:

        e   = clip(KL / KL_target − 1, −0.2, 0.2)
        β  ← β · (1 + e · n / horizon)

    KL: the mean over the batch of each sequence's summed KL(π ‖ π_ref) (nats per completion), n: the
    number of sequences it was measured on, horizon: how many sequences a full correction takes (the paper
    uses 10,000). β rises while the KL is above target and falls below it. Checkpointed with the run.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon < 1:
            raise ValueError(f"adaptive KL needs target > 0 and horizon >= 1, got {target}, {horizon}")
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β toward the coefficient that holds the KL at the target, after a batch of n sequences."""
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
