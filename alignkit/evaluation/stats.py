"""Statistics of an evaluation: pure functions of scores laid out prompt-major, (P * n,) with prompt i's samples
at [i * n, (i + 1) * n), as `alignkit.generation.sampling.sample` returns them. Standard errors are over prompts (a
prompt's samples are not independent). A NaN score is a sample no reward source scored (a Python reward's
None): every statistic is over the scored samples, a prompt with none left out of the per-prompt ones.
"""

from __future__ import annotations

import math

import torch


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with n - 1, over sqrt n; 0 for n < 2)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_stderr of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score_stats(scores: torch.Tensor, num_samples: int) -> dict[str, float | None]:
    """{mean, std, stderr} of (P * n,) prompt-major scores, n = `num_samples`, in float64.

    std is the sample standard deviation (n - 1) over all P * n scores; stderr is the standard error of
    the mean over prompts: std of the P per-prompt means / sqrt P (None when P < 2). NaNs (unscored) are
    left out, a prompt with no scored sample too; their share is `unscored` where there are some.
    """
    x = scores.detach().double().reshape(-1).cpu()
    per_prompt = x.view(-1, num_samples).nanmean(1)  # (P,), NaN for a prompt with no scored sample
    per_prompt = per_prompt[~per_prompt.isnan()]
    scored = x[~x.isnan()]
    P = per_prompt.numel()
    out = {
        "mean": float(scored.mean()) if scored.numel() else math.nan,
        "std": float(scored.std()) if scored.numel() > 1 else 0.0,
        "stderr": float(per_prompt.std() / math.sqrt(P)) if P > 1 else None,
    }
    if scored.numel() < x.numel():
        out["unscored"] = 1 - scored.numel() / x.numel()
    return out


def percent_change(before: float, after: float) -> float | None:
    """(after - before) / |before| x 100: positive when the score rose, whatever the sign of `before`.

    0 when both are 0; None (undefined) when only `before` is 0.
    """
    if before == 0:
        return 0.0 if after == 0 else None
    return (after - before) / abs(before) * 100


def win_rate(base: torch.Tensor, aligned: torch.Tensor, num_samples: int) -> float:
    """Fraction of prompts where the aligned mean score over its n samples beats the base's; ties count ½.

    base, aligned: (P * n,) prompt-major scores, n = `num_samples`. The means are over scored samples; a
    prompt where either model has none is left out (NaN when no prompt is left).
    """
    b = base.detach().double().reshape(-1, num_samples).nanmean(1)  # (P,)
    a = aligned.detach().double().reshape(-1, num_samples).nanmean(1)  # (P,)
    both = ~(a.isnan() | b.isnan())
    a, b = a[both], b[both]
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def compare_scores(base: torch.Tensor, aligned: torch.Tensor, num_samples: int) -> dict:
    """Before/after statistics of one source's (P * n,) prompt-major scores of the base and aligned samples.

    {base: score_stats, aligned: score_stats, difference, difference_std, difference_stderr (of the
    per-sample differences aligned_j - base_j: paired, as sample j of both shares its seed; over the pairs
    both scored), percent_change (of the means), win_rate}.
    """
    before, after = score_stats(base, num_samples), score_stats(aligned, num_samples)
    difference = score_stats(aligned.double() - base.double(), num_samples)
    return {
        "base": before,
        "aligned": after,
        "difference": difference["mean"],
        "difference_std": difference["std"],
        "difference_stderr": difference["stderr"],
        "percent_change": percent_change(before["mean"], after["mean"]),
        "win_rate": win_rate(base, aligned, num_samples),
    }
