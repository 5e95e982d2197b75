"""What a guide did to a rollout (`generation.guided`; docs/online_rl.md, *Guided rollouts*): the mixture's
figures, which completion tokens are the guide's own traces (guide.mode=traces), the policy's log-probs of them
before a step's updates, and the shaping's figures on them. Used by the grpo and ppo steps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignkit.losses.policy_shaping import shaping_statistics
from alignkit.rollout import Rollout, own_tokens, token_logps_in_batches


def guide_metrics(rollout: Rollout, *, gather=None) -> dict[str, float]:
    """What a guide did to the rollout (`generation.guided`), over every process's completions (`gather`); {}
    where no guide drew it:

        guide/alpha                  the policy's weight α in the mixture q = α·π + (1 − α)·g at this step
        guide/frac_argmax_changed    the share of completion tokens where argmax q ≠ argmax π
        guide/frac_tokens_changed    the share where π alone would have drawn another token from the same uniform
        guide/frac_changed           the share of completions with such a token: ones the policy alone would
                                     not have written from the uniforms they were drawn with
        guide/reward_changed, guide/reward_unchanged   the mean reward of each kind, where there is one
                                     (not the guide's effect: a longer completion is likelier to be changed)
    """
    details = rollout.sampler_details
    if "alpha" not in details:
        return {}
    gather = gather or (lambda x: x)
    tokens = gather(torch.tensor(rollout.completion_lengths, dtype=torch.float32)).sum().clamp(min=1)
    tokens_changed = gather(details["tokens_changed"])  # (N·W,)
    changed, scores = tokens_changed > 0, gather(rollout.scores)
    out = {
        "guide/alpha": float(details["alpha"][0]),
        "guide/frac_argmax_changed": float(gather(details["argmax_changed"]).sum() / tokens),
        "guide/frac_tokens_changed": float(tokens_changed.sum() / tokens),
        "guide/frac_changed": float(changed.float().mean()),
    }
    for name, rows in (("changed", changed), ("unchanged", ~changed)):
        if rows.any():
            out[f"guide/reward_{name}"] = float(scores[rows].mean())
    return out


def guide_traces(rollout: Rollout) -> dict[str, torch.Tensor]:
    """{"guide_mask": (N, T)}, 1 on the completion tokens of the guide's traces (guide.mode=traces,
    `generation.guided.TracesSampler`), for `Rollout.batch` to carry into every minibatch; {} where the rollout
    holds none."""
    flags = rollout.sampler_details.get("guide_trace")
    if flags is None or not flags.any():
        return {}
    return {"guide_mask": rollout.completion_mask * (flags > 0).unsqueeze(-1)}


def traces_logps(forward: Callable, rollout: Rollout, batch_size: int, device) -> torch.Tensor | None:
    """(N, T) the policy's log-probs before a step's updates, on its guide traces' tokens at least, for
    `traces_metrics`: `rollout.old_logps` where the step took them, else `forward`'s over the guide's rows
    alone, `batch_size` rows at a time (a no-grad pass over k / G of the rollout); None without traces."""
    if not guide_traces(rollout):
        return None
    if rollout.old_logps is not None:
        return rollout.old_logps
    rows = torch.nonzero(rollout.sampler_details["guide_trace"] > 0).flatten().tolist()
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return token_logps_in_batches(forward, rollout, batches, device)["token_logps"]


def traces_metrics(
    rollout: Rollout, logps: torch.Tensor | None, *, gamma: float, gather=None
) -> dict[str, float]:
    """What the guide's traces did to a rollout (guide.mode=traces), over every process's completions
    (`gather`); {} where no guide wrote traces. `logps` (N, T): the policy's log-probs of the rollout's tokens
    (of the guide's at least) before the step's updates (`traces_logps`), None at k = 0; γ: the shaping's
    (`losses.policy_shaping`).

        guide/traces                            k, the guide's completions in each group at this step
        guide/reward_traces, guide/reward_policy   the mean reward of the guide's traces and of the policy's own
                                                samples, in the same step
        guide/prob/mean                         mean π on the guide's tokens
        guide/shaping_weight/mean, /min, /max   of the shaping's f'(π) = γ / (π + γ)² on them
        guide/frac_amplified                    the share of them with f'(π) > 1
        guide/ratio/median                      the median π / g, the plain importance weight the shaping
                                                replaces (its mean is 1 by construction: E_g[π/g] = Σ π = 1)
    """
    if "guide_trace" not in rollout.sampler_details:
        return {}
    gather = gather or (lambda x: x)
    flags, scores = gather(rollout.sampler_details["guide_trace"]) > 0, gather(rollout.scores)  # (N·W,)
    out = {"guide/traces": float(rollout.sampler_details["traces"][0])}
    for name, rows in (("traces", flags), ("policy", ~flags)):
        if rows.any():
            out[f"guide/reward_{name}"] = float(scores[rows].mean())
    if logps is None:
        return out
    mask = rollout.completion_mask.bool() & ~own_tokens(rollout)  # (N, T) the guide's tokens
    pi = gather(logps[mask].float())  # (M,) every process's
    stats = shaping_statistics(pi, gamma=gamma)
    stats["ratio/median"] = (pi - gather(rollout.sampler_logps[mask].float())).exp().median()
    return {**out, **{f"guide/{k}": float(v) for k, v in stats.items()}}
