"""The Bradley–Terry reward-model loss: a pure function of the rewards a model gives each pair.

Under the Bradley–Terry model (Bradley & Terry 1952; as used for RLHF reward models by Ouyang et al. 2022,
eq. 1) the probability that y_w is preferred to y_l is σ(r(x, y_w) − r(x, y_l)), and the reward model is
fitted by maximum likelihood:

    loss = −log σ(r_w − r_l − m)  +  c·(r_w + r_l)²

m is an optional per-row margin (Llama 2, Touvron et al. 2023, eq. 2: a pair rated "significantly better"
must be won by more), and c·(r_w + r_l)² the auxiliary centring term of Eisenstein et al. 2023 ("Helping
or Herding?", sec. 3), which pins the mean reward near 0 since BT only identifies rewards up to a constant.
A soft label p (the probability that y_w really is better) turns the first term into the binary
cross-entropy −p·log σ(z) − (1 − p)·log σ(−z) with z = r_w − r_l − m; p = 1 is the equation above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.types import LossOutput


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    preference: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> LossOutput:
    """Per-pair Bradley–Terry loss (module docstring) of scalar rewards.

    chosen_rewards, rejected_rewards: (B,) r(x, y_w), r(x, y_l), with gradients.
    margin: optional (B,) m, in reward units. preference: optional (B,) soft labels p in [0, 1].
    center_rewards_coefficient: c >= 0.
    Returns LossOutput with losses (B,), the detached rewards, and metrics `bt_loss` (the first term's
    mean) and `center_penalty` (the mean of (r_w + r_l)², when c > 0).
    """
    z = chosen_rewards - rejected_rewards
    if margin is not None:
        z = z - margin
    bt = -F.logsigmoid(z)
    if preference is not None:
        # −p log σ(z) − (1 − p) log σ(−z), with log σ(−z) = log σ(z) − z
        bt = bt + (1 - preference) * z
    losses, metrics = bt, {"bt_loss": float(bt.detach().mean())}
    if center_rewards_coefficient:
        penalty = (chosen_rewards + rejected_rewards) ** 2
        losses = losses + center_rewards_coefficient * penalty
        metrics["center_penalty"] = float(penalty.detach().mean())
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), metrics)
