"""Token-level divergences between a student's and a teacher's next-token distributions, for generalised
knowledge distillation (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes") and for the full-vocabulary KL penalty of offline RL.

Convention (GKD's, eq. 2 and its code; TRL's `generalized_jsd_loss`): P is the teacher, Q the student,
both softmax(logits / τ) over the full vocabulary, and for β in (0, 1)

    M        = β·P + (1 − β)·Q
    JSD(β)   = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M)

with the end points defined as the two KLs: β = 0 is the forward KL(P ‖ Q) (mode covering, what
supervised KD minimises) and β = 1 the reverse KL(Q ‖ P) (mode seeking). They are the limits of
JSD(β)/β as β → 0 and of JSD(β)/(1 − β) as β → 1 (JSD(β) itself goes to 0 at both ends). No τ² factor
is applied (GKD and TRL apply none).

`chunked_divergence` evaluates it on N positions a chunk at a time from hidden states, so (N, V) float32
logits of either model never exist at once, in the forward or (by checkpointing) the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["DIVERGENCES", "chunked_divergence", "divergence_beta", "generalized_jsd"]

# name -> the β of `generalized_jsd` it is (None: the config's `beta`); keyed by
# alignkit.config.supervised.DIVERGENCE_NAMES, what distill's `divergence` accepts (tests/test_config.py checks).
DIVERGENCES: dict[str, float | None] = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}


def divergence_beta(name: str, beta: float) -> float:
    """The β of `generalized_jsd` that divergence `name` is: forward_kl 0, reverse_kl 1, jsd `beta`."""
    if name not in DIVERGENCES:
        raise ValueError(f"divergence '{name}' is not one of {', '.join(DIVERGENCES)}")
    fixed = DIVERGENCES[name]
    return beta if fixed is None else fixed


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """JSD(β) between teacher P and student Q at every position (module docstring for the convention).

    student_logits, teacher_logits: (..., V), any float dtype (computed in float32, or float64 when
    given). Returns (...,) divergences in nats: forward KL(P ‖ Q) at β = 0, reverse KL(Q ‖ P) at β = 1.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32, or float64 when given
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:  # KL(a ‖ b), summed over V
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def chunked_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_logits: Callable[[torch.Tensor], torch.Tensor],
    teacher_logits: Callable[[torch.Tensor], torch.Tensor],
    *,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(JSD(β) at each of N positions, log q(target) of the student at temperature 1 or None).

    student_hidden: (N, Hs), with grad; teacher_hidden: (N, Ht), no grad (the two models may differ in
    width, not in vocabulary). student_logits / teacher_logits map a chunk of hidden states to (C, V)
    logits (the output head, with its softcap). targets: optional (N,) ids whose student log-probs are
    returned as well (offline RL's NLL from the same forward). Each chunk of `chunk_size` positions is
    checkpointed, so the backward rebuilds one chunk's logits at a time. Returns (N,) float32 tensors.
    """

    def chunk(h: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        z = student_logits(h).float()  # (C, V)
        with torch.no_grad():
            zt = teacher_logits(t).float()  # (C, V)
        div = generalized_jsd(z, zt, beta, temperature)  # (C,)
        if y is None:
            return div.unsqueeze(-1)
        logp = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
        return torch.stack([div, logp], dim=-1)  # (C, 2)

    out = []
    for start in range(0, student_hidden.shape[0], chunk_size):
        h = student_hidden[start : start + chunk_size]
        t = teacher_hidden[start : start + chunk_size]
        y = None if targets is None else targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(chunk, h, t, y, use_reentrant=False))
        else:
            out.append(chunk(h, t, y))
    if not out:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return empty, (None if targets is None else empty)
    values = torch.cat(out)  # (N, 1) or (N, 2)
    return values[:, 0], (None if targets is None else values[:, 1])
