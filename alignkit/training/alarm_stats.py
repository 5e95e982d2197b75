"""Pure statistics of the alarms (`training.alarms`), on plain sequences of numbers or token ids, each tested
against hand-computed numbers (tests/test_alarms.py). The figures a step's rollout gives them are taken in
`training.alarm_figures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _moments(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float] | None:
    """(Sxx, Syy, Sxy): the centred sums of squares and products; None with fewer than 2 points."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"series of different lengths: {n} and {len(y)}")
    if n < 2:
        return None
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    dx, dy = [v - mx for v in x], [v - my for v in y]
    return (
        math.fsum(v * v for v in dx),
        math.fsum(v * v for v in dy),
        math.fsum(a * b for a, b in zip(dx, dy)),
    )


def _constant(sxx: float, x: Sequence[float]) -> bool:
    """Whether a centred sum of squares is zero up to rounding (relative to the values' own size)."""
    return sxx <= 1e-12 * max(1.0, math.fsum(v * v for v in x))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r of two equally long series: Sxy / sqrt(Sxx Syy); None with fewer than 2 points or a constant
    series (no correlation is defined)."""
    m = _moments(x, y)
    if m is None or _constant(m[0], x) or _constant(m[1], y):
        return None
    sxx, syy, sxy = m
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """The least-squares slope of y on x, Sxy / Sxx (e.g. reward per completion token); None with fewer than 2
    points or a constant x."""
    m = _moments(x, y)
    if m is None or _constant(m[0], x):
        return None
    return m[2] / m[0]


def moments(x: Sequence[float], y: Sequence[float]) -> tuple[int, float, float, float]:
    """(n, var x, var y, cov(x, y)) of two equally long series, population moments (divided by n): what
    `pooled_within` combines over steps."""
    m = _moments(x, y)
    n = len(x)
    if m is None:
        return n, 0.0, 0.0, 0.0
    return n, m[0] / n, m[1] / n, m[2] / n


def pooled_within(parts: Sequence[tuple[int, float, float, float]]) -> tuple[float | None, float | None]:
    """(r, slope) of y on x within groups (steps), pooled: each group's (n, var x, var y, cov) from `moments`,
    r = Σ n·cov / sqrt(Σ n·var x · Σ n·var y), slope = Σ n·cov / Σ n·var x. The trends between groups are left
    out (each group is centred on its own means); a group with more spread weighs more, as in one regression
    over all points. None where x or y never varies within a group."""
    sxx = math.fsum(n * vx for n, vx, _, _ in parts)
    syy = math.fsum(n * vy for n, _, vy, _ in parts)
    sxy = math.fsum(n * c for n, _, _, c in parts)
    if sxx <= 0:
        return None, None
    return (sxy / math.sqrt(sxx * syy) if syy > 0 else None), sxy / sxx


def trend(values: Sequence[float]) -> tuple[float, float]:
    """(slope per step, Pearson r with the step number) of a series taken at steps 0, 1, 2, ...: how fast it
    moves and how clearly (r 0 for a constant series)."""
    steps = list(range(len(values)))
    return slope(steps, values) or 0.0, pearson(steps, values) or 0.0


def thirds(values: Sequence[float]) -> tuple[float, float, float]:
    """The means of a series' first, middle and last thirds, the outer two of equal size k = len // 3 (10 values:
    3, 4, 3), so that their centres are equally spaced: (b − a) and (c − b) are rises over equal spans."""
    first, middle, last = third_parts(values, 1, "thirds")
    return sum(first) / len(first), sum(middle) / len(middle), sum(last) / len(last)


def third_parts(
    values: Sequence[float], least: int, name: str
) -> tuple[Sequence[float], Sequence[float], Sequence[float]]:
    """A series' first, middle and last thirds as `thirds` takes them (the outer two of k = len // 3 values),
    k at least `least`; otherwise a ValueError naming the caller `name` and the length."""
    k = len(values) // 3
    if k < least:
        raise ValueError(f"{name} needs at least {3 * least} values, got {len(values)}")
    return values[:k], values[k : len(values) - k], values[len(values) - k :]


def rise_z(values: Sequence[float]) -> float:
    """How many standard errors the last third's mean is above the first third's (`thirds`' outer two), each
    third's spread taken as its noise: (c − a) / sqrt(s_a² / k + s_c² / k); ±inf when both thirds are
    constant and differ, 0 when they are equal."""
    first, _, last = third_parts(values, 2, "rise_z")
    k = len(first)
    mean_a, mean_c = sum(first) / k, sum(last) / k
    var = lambda xs, m: sum((x - m) ** 2 for x in xs) / (k - 1)  # noqa: E731
    se = math.sqrt((var(first, mean_a) + var(last, mean_c)) / k)
    if se == 0:
        return 0.0 if mean_c == mean_a else math.copysign(math.inf, mean_c - mean_a)
    return (mean_c - mean_a) / se


def ngrams(sequence: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The sequence's n-grams in order (len − n + 1 of them; none when it is shorter than n)."""
    return [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float | None:
    """distinct-n (Li et al. 2016): distinct n-grams over all n-grams of the completions together; 1 when no
    n-gram repeats anywhere, 1 / count when every one is the same. None where no completion holds n tokens."""
    grams = [g for s in sequences for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else None


def repeats_ngram(sequence: Sequence[int], n: int) -> bool:
    """Whether some n-gram occurs twice or more in the sequence (a loop, or a phrase said again)."""
    grams = ngrams(sequence, n)
    return len(set(grams)) < len(grams)
