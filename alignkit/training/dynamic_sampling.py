"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", §3.2) for a GRPO step: groups whose G rewards are all
equal have advantage 0 and carry no policy gradient, so they are dropped and more prompts drawn until the
step holds `batch_size` groups on every process, or until the run's `extra_draws` are spent
(`OnlineRun(..., extra_draws=dynamic_sampling_max_rollouts)`).

    rollout, seed, record = collect_informative(run, policy, tokenizer, prompts, rewards, sampling=sampling,
                                                group_size=G, reward_terms=terms, pad_id=pad)

Every draw is a whole rollout of `batch_size` prompts x G completions on each process. The decision to draw
again is made jointly: every process's count of kept groups is gathered, and all of them draw again while
the fewest is short of `batch_size`, so every process makes the same draws and reaches the same collectives
(reward normalisers, the sampler's sync, the updates). Each then keeps its first `batch_size` informative
groups, in draw order. Where the bound is hit first, a process short of groups tops its batch up with its
first dropped ones (advantage 0, as without dynamic sampling): every process trains on the same number of
groups and steps, and the batch keeps its shape (minibatch_size and grad_accum still divide it).

Extra draws take their prompts from the run's second seeded order (`OnlineRun.step_prompts`), draw d of
step s at a fixed place in it, and sample with a seed of (seed, step, d): a resumed run redraws exactly the
prompts and completions the uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from alignkit.losses.group_rewards import unanimous_groups
from alignkit.rollout import Rollout

__all__ = ["collect_informative", "pick_groups", "select_groups"]


def pick_groups(informative: list[torch.Tensor], want: int) -> tuple[list[tuple[int, int]], int]:
    """Which groups a process trains on, from the (n_d,) bool `informative` flags of each of its draws:
    (draw, group) pairs of its first `want` informative groups in draw order, then, where there are fewer,
    its first unanimous ones; and how many of those were topped up."""
    kept = [(d, int(g)) for d, flags in enumerate(informative) for g in flags.nonzero().flatten()]
    filler = [(d, int(g)) for d, flags in enumerate(informative) for g in (~flags).nonzero().flatten()]
    picks = kept[:want]
    topped_up = max(0, want - len(picks))
    return picks + filler[:topped_up], topped_up


def select_groups(rollouts: list[Rollout], picks: list[tuple[int, int]], *, pad_id: int) -> Rollout:
    """One rollout of the picked groups ((draw, group) pairs of `pick_groups`), in that order: rows of the
    draws' tensors and lists, (N, T) tensors right-padded to the longest (`pad_id` in input_ids, 0 in the
    masks and log-probs). Per-rollout figures: the timings summed over the draws; the reward sources' own
    metrics and statistics the last draw's (their counters run since the source was built)."""
    G = rollouts[0].group_size
    rows = [(d, g * G + j) for d, g in picks for j in range(G)]

    def stacked(name: str, pad=0) -> torch.Tensor | None:
        if getattr(rollouts[0], name) is None:
            return None
        values = [getattr(rollouts[d], name)[r] for d, r in rows]
        if values[0].dim() == 0:
            return torch.stack(values)
        width = max(v.shape[0] for v in values)
        return torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[0]), value=pad) for v in values])

    def listed(name: str) -> list:
        return [getattr(rollouts[d], name)[r] for d, r in rows]

    last = rollouts[-1]
    tensors = {"input_ids": stacked("input_ids", pad_id), "attention_mask": stacked("attention_mask")}
    for name in ("completion_mask", "ended", "scores", "sampler_logps", "encoder_attention_mask"):
        tensors[name] = stacked(name)
    tensors["encoder_input_ids"] = stacked("encoder_input_ids", pad_id)
    return dataclasses.replace(
        last,
        **tensors,
        prompt_lengths=listed("prompt_lengths"),
        completion_lengths=listed("completion_lengths"),
        prompts=listed("prompts"),
        completions=listed("completions"),
        source_scores={
            k: torch.stack([rollouts[d].source_scores[k][r] for d, r in rows]) for k in last.source_scores
        },
        sampler_details={
            k: torch.stack([rollouts[d].sampler_details[k][r] for d, r in rows]) for k in last.sampler_details
        },
        timings={k: sum(r.timings.get(k, 0.0) for r in rollouts) for k in last.timings},
    )


def collect_informative(
    run,
    policy,
    tokenizer,
    prompts,
    rewards,
    *,
    sampling,
    group_size: int,
    reward_terms: Callable[[Rollout], torch.Tensor],
    pad_id: int,
) -> tuple[Rollout, int, dict[str, float]]:
    """(rollout, seed, metrics): the step's rollout of `run.cfg.batch_size` groups on this process, drawn by
    `run.collect`, with up to `run.extra_draws` extra draws, as the module docstring says; seed is
    the step's own (draw 0's). `reward_terms(rollout)` gives the (N·G,) or (N·G, K) rewards the advantages
    will see (before any KL penalty): a group is dropped when all of them are equal within it.
    `run.extra_draws=0` is dynamic sampling off: the step's own draw as it is, and no metrics.

    metrics, over every process: `dynamic_sampling/groups_kept` (informative groups trained on),
    `/groups_dropped` (unanimous groups left out), `/groups_topped_up` (unanimous groups trained on because
    the bound was hit; 0 otherwise), `/groups_surplus` (informative groups drawn beyond the batch, left out),
    `/extra_rollouts` (extra draws this step, each batch_size prompts on every process)."""
    want, max_rollouts = run.cfg.batch_size, run.extra_draws
    if max_rollouts == 0:  # dynamic sampling off: the step's own draw, as it is
        rollout, seed = run.collect(
            policy, tokenizer, prompts, rewards, sampling=sampling, group_size=group_size
        )
        return rollout, seed, {}

    def draw(d: int):
        rollout, seed = run.collect(
            policy, tokenizer, prompts, rewards, sampling=sampling, group_size=group_size, draw=d
        )
        return rollout, seed, ~unanimous_groups(reward_terms(rollout), group_size)

    first, seed, flags = draw(0)
    rollouts, informative = [first], [flags]
    while len(rollouts) <= max_rollouts:
        kept = torch.tensor([sum(int(f.sum()) for f in informative)])
        if int(run.gather(kept).min()) >= want:  # every process has its batch: the same answer everywhere
            break
        rollout, _, flags = draw(len(rollouts))
        rollouts.append(rollout)
        informative.append(flags)
    picks, topped_up = pick_groups(informative, want)
    drawn = sum(f.numel() for f in informative)
    useful = sum(int(f.sum()) for f in informative)
    kept = len(picks) - topped_up
    counts = torch.tensor([[kept, drawn - useful - topped_up, topped_up, useful - kept]])
    kept, dropped, topped, surplus = run.gather(counts).sum(0).tolist()  # (W, 4) -> every process's
    metrics = {
        "dynamic_sampling/groups_kept": float(kept),
        "dynamic_sampling/groups_dropped": float(dropped),
        "dynamic_sampling/groups_topped_up": float(topped),
        "dynamic_sampling/groups_surplus": float(surplus),
        "dynamic_sampling/extra_rollouts": float(len(rollouts) - 1),
    }
    if len(rollouts) == 1 and bool(informative[0].all()):
        return first, seed, metrics  # nothing dropped: the draw itself, bit for bit
    return select_groups(rollouts, picks, pad_id=pad_id), seed, metrics
