"""mDPO's extra terms (Wang et al. 2024, "mDPO: Conditional Preference Optimization for Multimodal Large
Language Models", eq. 3-5): a pure function of per-sequence log-prob sums.

With m the image, m' a corrupted copy (`data.vision_rows.corrupt_image`), y_w the chosen response and
r(y | m) = β·(log πθ(y|m,x) − log πref(y|m,x)):

    conditional  L_CoPO = −log σ( r(y_w | m) − r(y_w | m') )     the answer must depend on the real image
    anchor       L_AncPO = −log σ( r(y_w | m) − δ ),  δ = 0       the chosen reward must stay positive

mDPO's loss is the paired DPO loss plus both terms (the authors' mdpo_trainer.py weighs all three 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mdpo_terms(
    chosen_logps: torch.Tensor,
    corrupt_chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_corrupt_chosen_logps: torch.Tensor,
    *,
    beta: float,
    anchor: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_CoPO + L_AncPO per pair (B,), metrics): see the module docstring. All inputs (B,) log-prob sums of
    the chosen response under the real image and under the corrupted one, for the policy and the reference.
    Metrics (detached means): the two losses, the corrupted-image reward, the conditional margin
    r(y_w|m) − r(y_w|m') and the share of pairs where it is positive."""
    chosen_reward = beta * (chosen_logps - ref_chosen_logps)  # (B,)
    corrupt_reward = beta * (corrupt_chosen_logps - ref_corrupt_chosen_logps)  # (B,)
    conditional = -F.logsigmoid(chosen_reward - corrupt_reward)
    anchored = -F.logsigmoid(chosen_reward - anchor)
    margin = (chosen_reward - corrupt_reward).detach()
    metrics = {
        "mdpo/conditional_loss": conditional.detach().mean(),
        "mdpo/anchor_loss": anchored.detach().mean(),
        "mdpo/conditional_margin": margin.mean(),
        "mdpo/conditional_accuracy": (margin > 0).float().mean(),
        "rewards/corrupt_chosen": corrupt_reward.detach().mean(),
        "logps/corrupt_chosen": corrupt_chosen_logps.detach().mean(),
    }
    return conditional + anchored, metrics
