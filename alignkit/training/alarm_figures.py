"""The per-step figures the alarms read (`training.alarms`), from what a step's rollout and record already hold
(no model pass of their own), each over every process's completions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from alignkit.rollout import Rollout
from alignkit.training.alarm_stats import moments, ngrams, pearson, repeats_ngram


def ngram_codes(sequences: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """(M,) int64: one code per n-gram of the sequences (none across two), equal for equal n-grams on every
    process. Exact where every token id is below 2^(63 // n) (a 2.1M vocabulary for trigrams): the ids packed as
    digits of base 2^(63 // n), computed on tensors. Otherwise Python's hash of the n-gram's tuple (ints and
    tuples of ints are not salted by PYTHONHASHSEED: the same on every process), where two different n-grams
    share a code with probability 2^-64."""
    rows = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences if len(s) >= n]
    if not rows:
        return torch.zeros(0, dtype=torch.long)
    bits = 63 // n
    if max(int(r.max()) for r in rows) >= 2**bits or min(int(r.min()) for r in rows) < 0:
        return torch.tensor([hash(g) for s in sequences for g in ngrams(s, n)], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T)
    windows = padded.unfold(1, n, 1)  # (B, T − n + 1, n)
    valid = torch.arange(windows.shape[1])[None, :] + n <= lengths[:, None]  # (B, T − n + 1)
    digits = torch.tensor([2 ** (bits * (n - 1 - k)) for k in range(n)], dtype=torch.long)  # (n,)
    return (windows[valid] * digits).sum(-1)


def pooled_distinct_n(sequences: Sequence[Sequence[int]], n: int, gather: Callable) -> float | None:
    """`distinct_n` of every process's completions together, without sending them: each process sends the codes
    of its distinct n-grams (`ngram_codes`) and its n-gram count (`gather`: (k,) -> every process's rows, in
    rank order)."""
    codes = ngram_codes(sequences, n)
    count = gather(torch.tensor([codes.numel()], dtype=torch.long)).sum()
    if int(count) == 0:
        return None
    return int(gather(codes.unique()).unique().numel()) / int(count)


def step_figures(
    rollout: Rollout,
    record: dict,
    *,
    gather: Callable | None = None,
    source_signs: dict[str, float] | None = None,
    reference: bool = True,
    repeat_ngram: int = 4,
    returns: torch.Tensor | None = None,
) -> dict[str, float]:
    """The step's figures for `training.alarms.Alarms.update`, each over every process's completions
    (`gather`, `OnlineRun.gather`; the record's figures already are):

        reward, length            the mean reward (the reward set's total) and completion length (tokens)
        reward_n, reward_len_var, the scored completions, and the population moments of length and reward
        reward_var, len_reward_cov  over them (`alarm_stats.moments`, pooled over a window by `pooled_within`)
        len_reward_corr           Pearson(length, reward) over the step's completions (shown, not pooled)
        return, return_...        the same of `returns` ((N,) this process's completions), where given: what
                                  the update maximises where it is not the reward (the reward less β·KL,
                                  with a length penalty)
        entropy                   the record's mean token entropy (the policy's, over the update's tokens), or
                                  where the command logs none, the sampled tokens' mean negative log-prob
                                  under the sampler (a one-sample estimate of the same entropy)
        kl                        the per-token KL to the reference, k1 = log π − log π_ref averaged over the
                                  completion tokens, π the sampling policy's log-probs (the trainer's where it
                                  took them, else the sampler's); with `reference` only (the rollout's ref_logps
                                  cover every completion)
        distinct_2, distinct_3    `distinct_n` of the step's completions
        repeated                  the share of completions with an n-gram twice (n = `repeat_ngram`)
        zero_std                  the record's share of groups with one reward for all (groups only); with
                                  dynamic sampling, of every group drawn (the dropped and topped-up ones)
        source/<name>             each reward source's mean, times the sign of its weight (`source_signs`), so
                                  that up is the way the optimizer pushes it

    A figure that cannot be taken (a constant length, no completion of n tokens, a NaN) is left out."""
    gather = gather or (lambda x: x)
    lengths = gather(torch.tensor(rollout.completion_lengths, dtype=torch.float64))  # (N·W,)
    scores = gather(rollout.scores.double())  # (N·W,)
    out = {"reward": float(record["reward"]), "length": float(record["completion_length"])}
    signals = {"reward": scores}
    if returns is not None:  # what the update maximises, where it is not the reward (the reward less β·KL)
        signals["return"] = gather(returns.double())
        out["return"] = float(signals["return"].nanmean())
    for name, values in signals.items():
        scored = values.isfinite()  # (a completion no source scored is NaN: it says nothing of length)
        x, y = lengths[scored].tolist(), values[scored].tolist()
        n, len_var, var, cov = moments(x, y)
        out.update(
            {f"{name}_n": float(n), f"{name}_len_var": len_var, f"{name}_var": var, f"len_{name}_cov": cov}
        )
        r = pearson(x, y)
        if r is not None:
            out[f"len_{name}_corr"] = r
    mask = rollout.completion_mask.double()  # (N, T)
    tokens = gather(mask.sum().reshape(1)).sum().clamp(min=1)
    if "entropy" in record:
        out["entropy"] = float(record["entropy"])
    elif rollout.sampler_logps is not None:
        out["entropy"] = float(
            -gather((rollout.sampler_logps.double() * mask).sum().reshape(1)).sum() / tokens
        )
    if reference and rollout.ref_logps is not None:
        logps = rollout.old_logps if rollout.old_logps is not None else rollout.sampler_logps
        if logps is not None:
            k1 = ((logps.double() - rollout.ref_logps.double()) * mask).sum().reshape(1)  # (1,)
            out["kl"] = float(gather(k1).sum() / tokens)
    ids = rollout.completion_ids()
    for n in (2, 3):
        d = pooled_distinct_n(ids, n, gather)
        if d is not None:
            out[f"distinct_{n}"] = d
    repeated = torch.tensor([float(repeats_ngram(s, repeat_ngram)) for s in ids], dtype=torch.float64)
    out["repeated"] = float(gather(repeated).mean())
    drawn = [record.get(f"dynamic_sampling/groups_{k}") for k in ("kept", "dropped", "topped_up", "surplus")]
    if None not in drawn and sum(drawn) > 0:  # dynamic sampling dropped them: the share of every group drawn
        out["zero_std"] = (drawn[1] + drawn[2]) / sum(drawn)
    elif "frac_reward_zero_std" in record:
        out["zero_std"] = float(record["frac_reward_zero_std"])
    signs = source_signs or {}
    if len(rollout.source_scores) > 1:
        for name in rollout.source_scores:
            mean = record.get(f"rewards/{name}/mean")
            if mean is not None:
                out[f"source/{name}"] = signs.get(name, 1.0) * float(mean)
    return {k: v for k, v in out.items() if math.isfinite(v)}  # (a diverged step's NaN is no figure)
