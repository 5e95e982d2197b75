"""Listwise preference objectives: a prompt with K responses and a target distribution or order over them.

Each objective takes per-sequence log-prob sums of every response of a batch of lists, shape (B, K), under
the policy and the reference, and a (B, K) bool `mask` of the slots that hold a response (lists may differ
in length; shorter ones are padded at the end). The implicit rewards

    r_k = β·(log πθ(y_k|x) − log πref(y_k|x))

are the logits of a distribution over the list, as DPO's are over a pair. Registered in `LISTWISE_LOSSES`
and trained by `alignkit listwise`; docs/objectives.md has the equations and when to choose each. With
K = 2 and all the weight on one response, both objectives are sigmoid DPO exactly.
"""

from __future__ import annotations

import torch

from alignkit.losses.registry import LossSpec, lookup
from alignkit.losses.types import ListwiseOutput

__all__ = [
    "LISTWISE_LOSSES",
    "get_listwise_loss",
    "listwise_soft_loss",
    "plackett_luce_loss",
    "soft_targets",
]

# The logit of an empty slot: e^MASKED underflows to exactly 0 in float32, yet, unlike −inf, it keeps
# every intermediate finite (0·−inf and −inf − −inf would be NaN, in the forward or the backward).
MASKED = -1e9


def soft_targets(scores: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Target distribution softmax(scores / temperature) over each list's slots, (B, K); 0 on empty slots.

    A low temperature puts the weight on the best-scored response (→ one-hot); a high one spreads it.
    """
    return torch.softmax((scores / temperature).masked_fill(~mask, MASKED), dim=-1).masked_fill(~mask, 0.0)


def _implicit_rewards(logps, ref_logps, mask, beta) -> torch.Tensor:
    return (beta * (logps - ref_logps)).masked_fill(~mask, 0.0)  # (B, K)


def _list_metrics(rewards: torch.Tensor, mask: torch.Tensor, best: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy (the target's best response has strictly the highest implicit reward), and the reward
    of the best response against the mean of the others."""
    rewards = rewards.detach()
    r_best = rewards.gather(1, best[:, None]).squeeze(1)  # (B,)
    others = rewards.masked_fill(~mask, float("-inf")).scatter(1, best[:, None], float("-inf"))
    n_others = (mask.sum(-1) - 1).clamp(min=1)
    r_others = (rewards.sum(-1) - r_best) / n_others
    return {
        "rewards/accuracies": float((r_best > others.max(-1).values).float().mean()),
        "rewards/best": float(r_best.mean()),
        "rewards/others": float(r_others.mean()),
        "rewards/margins": float((r_best - r_others).mean()),
    }


def listwise_soft_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    target: torch.Tensor,
    beta: float = 0.1,
) -> ListwiseOutput:
    """Cross-entropy from a target distribution p over the list to softmax of the implicit rewards.

        loss = −Σ_k p_k · log softmax(r)_k

    The listwise softmax loss of learning to rank (ListNet, Cao et al. 2007; LiPO, Liu et al. 2024) on
    DPO's implicit rewards. `target` (B, K) sums to 1 over each list (0 on empty slots): `soft_targets` of
    per-response scores, or probabilities given in the data. Minimised when softmax(r) = p, i.e. when the
    reward differences match the target's log-odds. With K = 2 and p = (1, 0) it is −log σ(r_1 − r_2),
    sigmoid DPO; with p = (p, 1−p), DPO with the soft label p.
    """
    rewards = _implicit_rewards(logps, ref_logps, mask, beta)
    log_q = torch.log_softmax(rewards.masked_fill(~mask, MASKED), dim=-1)  # (B, K)
    losses = -(target.to(log_q.dtype) * log_q).masked_fill(~mask, 0.0).sum(-1)  # (B,)
    metrics = _list_metrics(rewards, mask, target.masked_fill(~mask, -1.0).argmax(-1))
    return ListwiseOutput(losses, rewards.detach(), metrics)


def plackett_luce_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    order: torch.Tensor,
    beta: float = 0.1,
) -> ListwiseOutput:
    """Negative log-likelihood of a ranking under the Plackett–Luce model of the implicit rewards.

        loss = −Σ_{j=1}^{K−1} [ r_σ(j) − log Σ_{l=j}^{K} exp r_σ(l) ]

    σ is the ranking, best first: the best response is picked from all K with probability softmax(r), the
    next from the rest, and so on (Plackett 1975, Luce 1959; DPO under Plackett–Luce is Rafailov et al.
    2023, appendix A.3). `order` (B, K) long holds each row's response indices best first, its
    empty slots last. With K = 2 it is −log σ(r_σ(1) − r_σ(2)), sigmoid DPO.
    """
    rewards = _implicit_rewards(logps, ref_logps, mask, beta)
    ranked_mask = mask.gather(1, order)  # (B, K): valid slots first
    ranked = rewards.gather(1, order).masked_fill(~ranked_mask, MASKED)  # (B, K)
    tail_logsumexp = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)  # log Σ_{l ≥ j} exp r_σ(l)
    losses = -(ranked - tail_logsumexp).masked_fill(~ranked_mask, 0.0).sum(-1)  # (B,)
    metrics = _list_metrics(rewards, mask, order[:, 0])
    return ListwiseOutput(losses, rewards.detach(), metrics)


LISTWISE_LOSSES: dict[str, LossSpec] = {
    "soft": LossSpec(
        listwise_soft_loss,
        needs_reference=True,
        inputs=("target",),
        paper="Cao et al. 2007 (ListNet); Liu et al. 2024 (LiPO)",
    ),
    "plackett_luce": LossSpec(
        plackett_luce_loss,
        needs_reference=True,
        inputs=("order",),
        paper="Plackett 1975; Luce 1959; Rafailov et al. 2023, appendix A.3",
    ),
}


def get_listwise_loss(name: str) -> LossSpec:
    """The registered listwise objective called `name`; a clear error listing the valid names otherwise."""
    return lookup(name, LISTWISE_LOSSES, "listwise loss")
