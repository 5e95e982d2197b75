"""Statistics over the tokens a mask keeps, written once: mean, variance, whitening."""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1 (0 when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (Bessel's correction; 0 with fewer than 2 of them)."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    return (((values - mean) * mask).square().sum() / (n - 1).clamp(min=1)).where(n > 1, n * 0)


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(values − mean) / std over the masked entries (unbiased std); 0 off the mask.

    shift_mean=False only rescales (keeps the mean): the rule for rewards, whose sign carries meaning.
    Advantages are whitened with the mean removed (Huang et al. 2024, detail 7). (B, T) -> (B, T).
    With several processes each holding a share of a step, `gather` ((n,) -> every process's (Σn,)
    entries, in rank order) makes the mean and std the whole step's, as one process holding every row
    would take them (OpenRLHF all-reduces them the same way); only this process's values are returned.
    """
    m = mask.to(values.dtype)
    entries = values[mask.bool()]  # (n,) this process's masked entries
    if gather is not None:
        entries = gather(entries)  # (Σn,) every process's
    ones = torch.ones_like(entries)
    mean = masked_mean(entries, ones)
    whitened = (values - mean) * torch.rsqrt(masked_var(entries, ones) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m
