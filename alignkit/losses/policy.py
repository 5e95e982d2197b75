"""The maths of online RL on language models: KL estimators, group advantages, aggregation. The policy term
itself (the clipped surrogate, GSPO, CISPO) is in `losses.policy_losses`.

Pure functions of tensors, no model and no loop: `algorithms/grpo.py` (GRPO, Dr. GRPO, RLOO, REINFORCE++)
and `algorithms/ppo.py` call them in the order of an online step:

    rewards, _ = kl_penalised_scores(scores, old_logps, ref_logps, mask, beta=beta)  # when the KL is
                                                                     # in the reward (RLOO, REINFORCE++)
    adv   = compute_advantages(name, rewards, group_size)            # (N·G,) outcome rewards -> (N·G,)
    units = aggregation_units(mask, mode=...)                        # before the forward: optimizer_step's units
    per_token, metrics = get_policy_loss(name).fn(logps, old_logps, adv, mask, epsilon=..., epsilon_high=...)
    per_token = per_token + beta * kl_estimate(logps, ref_logps)     # when the KL is a loss term (GRPO)
    loss, _ = aggregate(per_token, mask, mode=...)

(A rollout drawn by a sampler other than the trainer also weights `per_token` by π_old / π_sampler:
`losses.off_policy.sampler_weights`.)

Conventions. Per-token tensors are (B, T) and come with a `mask` (B, T), 1 on completion tokens and 0 on
prompt and padding. Rewards are laid out prompt-major: (N·G,) with the G = `group_size` completions of a
prompt consecutive (what `generation.sample` with `num_return_sequences=G` produces). Every standard
deviation is the unbiased one (Bessel's correction, `torch.std`'s default, as TRL computes GRPO's). Metrics
are detached 0-dim tensors; nothing here turns a tensor into a Python number.

Unscored completions. A reward of NaN is a completion no reward source had an opinion on (a Python reward
returning None for it, `rewards.compose`). Every estimator gives it advantage 0 and leaves it out of every
statistic: its group's mean (the baseline) and standard deviation, the batch's standard deviation and mean.
A scored completion with no other scored one in its group has no baseline either: advantage 0 (GRPO's centred
reward and RLOO's leave-one-out baseline are undefined there). `kl_penalised_scores` keeps a NaN a NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.losses.registry import lookup

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "AdvantageSpec",
    "aggregate",
    "aggregation_units",
    "compute_advantages",
    "dr_grpo_advantages",
    "frac_reward_zero_std",
    "get_advantage",
    "grpo_advantages",
    "kl_estimate",
    "kl_penalised_scores",
    "reinforce_pp_advantages",
    "rloo_advantages",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
GRPO_SCALES = ("group", "batch", "none")


# --- KL estimators ---------------------------------------------------------------------------------------


def kl_estimate(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    estimator: str = "k3",
    old_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """A per-token estimate of KL(π ‖ π_ref) (Schulman 2020, "Approximating KL divergence").

    With x = log π(y_t) − log π_ref(y_t) for a token y_t sampled from π:

        k1 = x                     unbiased, often negative
        k2 = x² / 2                biased, low variance, ≥ 0
        k3 = exp(−x) − 1 + x       unbiased, low variance, ≥ 0 (GRPO, Shao et al. 2024, eq. 4)

    Under autograd, as a loss term on samples from π, k2's expected gradient is exactly ∇ KL(π ‖ π_ref),
    k3's is ∇ KL(π_ref ‖ π) and k1's is zero (tests/test_policy_losses.py checks these by enumeration).

    `old_logps`: the importance correction for tokens sampled from q = π_old (a reused rollout; on the first
    update q is π itself, with `old_logps = logps.detach()`). Each estimate is weighted by w = π/q =
    exp(log π − log π_old), chosen so that, whatever q, the expected gradient E_q[∇(w·k)] is exactly
    ∇ KL(π ‖ π_ref), the KL the penalty names:

        k1, k3   w stays in the graph: E_q[∇(w·k)] = ∇ E_π[k] = ∇ KL(π ‖ π_ref), since E_π[k] = KL for every π
                 (DeepSeek-V3.2's unbiased KL estimate, §3.1; TRL's use_bias_correction_kl). On-policy w = 1
                 but its gradient is not 0: k3's gradient moves from ∇ KL(π_ref ‖ π) to ∇ KL(π ‖ π_ref).
        k2       w is detached: E_q[w·∇k2] = E_π[∇k2] = ∇ KL(π ‖ π_ref); k2's value is biased, its plain
                 gradient is the unbiased one, so only the sampling distribution needs correcting.

    All inputs (B, T) -> (B, T); mask the result with `aggregate`.
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.square()
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator '{estimator}'. Valid: {', '.join(KL_ESTIMATORS)}")
    if old_logps is not None:
        ratio = torch.exp(logps - old_logps.detach())  # (B, T)
        kl = kl * (ratio.detach() if estimator == "k2" else ratio)
    return kl


def kl_penalised_scores(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL to the reference folded into each completion's reward, as one action (RLOO: Ahmadian et al.
    2024, r(x, y) − β·log(π(y|x) / π_ref(y|x)); TRL's RLOOTrainer; plain REINFORCE++, Hu 2025):

        KL_i = Σ_t mask·(log π_old(y_t) − log π_ref(y_t))      k1 summed over completion i's tokens
        r'_i = r_i − β·KL_i

    logps are those of the policy that sampled the completions (π_old, no gradient): Σ k1 is then an
    unbiased estimate of the sequence's KL(π_old ‖ π_ref), and its place in the reward makes the policy
    gradient carry ∇KL(π ‖ π_ref) through the score-function term (a loss-term k1 would have none).
    scores: (N,); logps, ref_logps, mask: (N, T). Returns (penalised scores (N,), KL_i (N,)), detached;
    feed the first to `compute_advantages` (gathered over processes like any reward).
    """
    k1 = kl_estimate(logps, ref_logps, estimator="k1").detach()  # (N, T)
    sequence_kl = torch.where(mask.bool(), k1, torch.zeros_like(k1)).sum(-1)  # (N,), padding never leaks in
    return scores - beta * sequence_kl.to(scores.dtype), sequence_kl


# --- group advantages ------------------------------------------------------------------------------------


def _grouped(rewards: torch.Tensor, group_size: int, what: str, min_group_size: int = 1) -> torch.Tensor:
    """(N·G,) prompt-major rewards -> (N, G) float, with an actionable error on a bad layout."""
    if rewards.dim() != 1:
        raise ValueError(
            f"{what}: rewards must be 1-D, (N·G,) prompt-major; got shape {tuple(rewards.shape)}"
        )
    if group_size < min_group_size:
        raise ValueError(
            f"{what}: group_size={group_size} but it needs at least {min_group_size} completions per "
            "prompt; raise the number of completions sampled per prompt"
        )
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(
            f"{what}: {rewards.numel()} rewards are not a whole number of groups of {group_size}; "
            "pass G consecutive rewards for each prompt"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)


def _batch_std(values: torch.Tensor, what: str) -> torch.Tensor:
    """The unbiased std of the scored (non-NaN) `values`, 0 with fewer than two of them; a ValueError for a
    batch of fewer than 2 rewards, scored or not."""
    if values.numel() < 2:
        raise ValueError(f"{what}: a batch standard deviation needs at least 2 rewards, got {values.numel()}")
    scored = values[~values.isnan()]
    return scored.std() if scored.numel() >= 2 else scored.new_zeros(())


def _group_stats(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scored, n, mean, std) of (N, G) rewards over each group's scored (non-NaN) entries: scored (N, G) bool,
    n, mean and the unbiased std (N, 1); a group with no scored entry has mean 0, one with fewer than two std 0."""
    scored = ~grouped.isnan()
    n = scored.sum(dim=1, keepdim=True)  # (N, 1)
    filled = torch.where(scored, grouped, torch.zeros_like(grouped))
    mean = filled.sum(dim=1, keepdim=True) / n.clamp(min=1)
    squares = torch.where(scored, (grouped - mean).square(), torch.zeros_like(grouped))
    std = (squares.sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    return scored, n, mean, std


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's group-relative advantage with outcome supervision (Shao et al. 2024, §4.1.2).

        A_i = (r_i − mean(r_group)) / (std + eps)

    std is the unbiased standard deviation of the group's G rewards (`scale="group"`, the paper), of all
    N·G rewards (`"batch"`: group mean with batch std, recommended by Liu et al. 2025, "Part I: Tricks
    or Traps?", and TRL's scale_rewards="batch"; it keeps a nearly unanimous group from being blown up to
    ±1), or no division at all (`"none"`: Dr. GRPO, Liu et al.
    2025, "Understanding R1-Zero-Like Training", which removes the question-difficulty bias). eps = 1e-4
    as in TRL. A group whose rewards are all equal gets A = 0 in every mode. A NaN reward (unscored) gets
    A = 0 and is left out of the mean and both stds (see the module docstring).

    rewards: (N·G,) prompt-major; gather them over processes first, since "batch" and the group statistics
    must see every completion of the step. Returns (N·G,) advantages, one per completion.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo_advantages: unknown scale '{scale}'. Valid: {', '.join(GRPO_SCALES)}")
    grouped = _grouped(rewards, group_size, "grpo_advantages", min_group_size=2)  # (N, G)
    scored, _, mean, std = _group_stats(grouped)
    centred = grouped - mean
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (_batch_std(grouped, "grpo_advantages") + eps)
    return torch.where(scored, centred, torch.zeros_like(centred)).reshape(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO's advantage (Liu et al. 2025): A_i = r_i − mean(r_group), without the std division.

    `grpo_advantages(rewards, group_size, scale="none")`, registered under its own name. (N·G,) -> (N·G,).
    """
    return grpo_advantages(rewards, group_size, scale="none")


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019).

        A_i = r_i − 1/(G−1) · Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean(r_group))

    Each completion's baseline is the mean reward of the other G − 1 completions of its prompt, which does
    not depend on the completion itself, so the estimator stays unbiased. Needs G ≥ 2. (Up to the factor
    G/(G−1) it is Dr. GRPO's advantage.) rewards: (N·G,) prompt-major -> (N·G,). With NaN rewards (unscored)
    the baseline is the mean of the other *scored* completions; an unscored one, or a scored one with no other
    scored completion in its group, gets A = 0.
    """
    grouped = _grouped(rewards, group_size, "rloo_advantages", min_group_size=2)  # (N, G)
    scored, n, _, _ = _group_stats(grouped)
    filled = torch.where(scored, grouped, torch.zeros_like(grouped))
    leave_one_out = (filled.sum(dim=1, keepdim=True) - filled) / (n - 1).clamp(min=1)
    advantages = grouped - leave_one_out
    return torch.where(scored & (n >= 2), advantages, torch.zeros_like(advantages)).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++'s globally normalised advantage (Hu 2025, "REINFORCE++"), for outcome rewards.

        c_i = r_i − mean(r_group)    if G > 1   ("REINFORCE++-baseline": the prompt's mean as baseline)
        c_i = r_i                    if G = 1   (plain REINFORCE++: one completion per prompt)
        A_i = (c_i − mean(c)) / (std(c) + eps)  mean and unbiased std over all N·G completions

    The global z-score is the paper's advantage normalisation. With G > 1, mean(c) is 0, so it only divides by the batch
    std of the centred rewards (unlike GRPO, no per-group division); with G = 1 it also subtracts the
    batch mean, the only baseline plain REINFORCE++ has. The statistics here are over completions, one
    value each; OpenRLHF whitens per token, which weights a completion by its length. A KL penalty folded
    into the reward (as the paper does, for G = 1) belongs in `rewards` before this is called
    (`kl_penalised_scores`: the completion's summed KL, where the paper and OpenRLHF pay each token's KL
    into that token's reward-to-go). Gather rewards over processes first. rewards: (N·G,) prompt-major
    -> (N·G,). A NaN reward (unscored) gets A = 0 and is left out of its group's mean and of the batch's mean
    and std.
    """
    grouped = _grouped(rewards, group_size, "reinforce_pp_advantages")  # (N, G)
    scored, _, mean, _ = _group_stats(grouped)
    centred = grouped - mean if group_size > 1 else grouped
    if scored.any():
        centred = centred - centred[scored].mean()
    advantages = centred / (_batch_std(centred, "reinforce_pp_advantages") + eps)
    return torch.where(scored, advantages, torch.zeros_like(advantages)).reshape(-1)


def frac_reward_zero_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fraction of prompts whose G rewards are all exactly equal, a detached 0-dim tensor.

    With G ≥ 2 such a group has zero advantage under every estimator here, so it contributes no policy
    gradient (with G = 1 every group is trivially equal and the value is 1); a high value says the prompts are too easy or too hard for the policy (DAPO's dynamic sampling filters
    them). rewards: (N·G,) prompt-major. NaN rewards (unscored) are left out: a group is unanimous when its
    scored rewards are all equal (or it has fewer than two).
    """
    grouped = _grouped(rewards, group_size, "frac_reward_zero_std")  # (N, G)
    scored = ~grouped.isnan()
    low = torch.where(scored, grouped, torch.full_like(grouped, torch.inf)).amin(dim=1)
    high = torch.where(scored, grouped, torch.full_like(grouped, -torch.inf)).amax(dim=1)
    return ((low == high) | (scored.sum(dim=1) < 2)).float().mean().detach()


@dataclass(frozen=True)
class AdvantageSpec:
    """A registered advantage estimator and the facts the training loop needs about it."""

    fn: Callable[..., torch.Tensor]
    """`fn(rewards, group_size, **params)`: (N·G,) prompt-major rewards -> (N·G,) advantages."""
    default_aggregation: str
    """How its paper turns per-token losses into the loss (one of `AGGREGATIONS`); the default of the
    training config's aggregation setting for this estimator."""
    min_group_size: int
    """The fewest completions per prompt it is defined for."""
    paper: str
    """Where it comes from."""
    params: tuple[str, ...] = ()
    """The keyword settings `fn` takes (`compute_advantages` refuses any other)."""
    kl_in_reward: Callable[[int], bool] = lambda group_size: False
    """`kl_in_reward(G)`: whether its recipe, at G completions per prompt, subtracts β·Σ_t k1 from each
    completion's reward before the advantages (`kl_penalised_scores`) rather than adding β·KL to the loss;
    the default of the training config's kl_in_reward."""
    kl_loss_estimator: str = "k3"
    """The per-token KL estimator (one of `KL_ESTIMATORS`) its recipe adds to the loss when the KL is not
    in the reward; the default of the training config's kl_estimator."""


# Its names are what GRPOConfig's `advantage` accepts (GRPOConfig.ranges; tests/test_config.py checks).
ADVANTAGES: dict[str, AdvantageSpec] = {
    # The GRPO paper's objective (eq. 3) averages each completion's tokens, then the G completions; its KL
    # is a k3 loss term (eq. 4), as in TRL's GRPOTrainer (Dr. GRPO keeps GRPO's).
    "grpo": AdvantageSpec(
        grpo_advantages, "sequence_mean", 2, "Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)", ("scale",)
    ),
    # Dr. GRPO divides by a constant (the generation budget) so that length does not bias the update.
    "dr_grpo": AdvantageSpec(
        dr_grpo_advantages, "constant", 2, "Liu et al. 2025, Understanding R1-Zero-Like Training (2503.20783)"
    ),
    # RLOO treats a completion as one action, loss −A·log π(y|x) = −A·Σ_t log π(y_t): every token weighs
    # the same, which "constant" reproduces exactly (scaled by 1/L); "token_mean" would rescale each step by
    # the sampled lengths and "sequence_mean" would down-weight the tokens of long completions.
    # Its KL is in the reward, r(x, y) − β·log(π(y|x)/π_ref(y|x)) of the whole completion (as TRL's
    # RLOOTrainer).
    "rloo": AdvantageSpec(
        rloo_advantages,
        "constant",
        2,
        "Ahmadian et al. 2024, Back to Basics (arXiv:2402.14740)",
        kl_in_reward=lambda group_size: True,
    ),
    # REINFORCE++ (and OpenRLHF, where it was introduced) averages over all tokens of the batch. Plain
    # REINFORCE++ (G = 1, OpenRLHF's `reinforce`) has the KL in the reward (the paper's KL penalty); its
    # authors' REINFORCE++-baseline recipe (G > 1, OpenRLHF's `reinforce_baseline`) a k2 loss term
    # (`--use_kl_loss --kl_estimator k2`), k2 being the estimator whose gradient is ∇KL(π ‖ π_ref).
    "reinforce_pp": AdvantageSpec(
        reinforce_pp_advantages,
        "token_mean",
        1,
        "Hu 2025, REINFORCE++ (arXiv:2501.03262)",
        kl_in_reward=lambda group_size: group_size == 1,
        kl_loss_estimator="k2",
    ),
}


def get_advantage(name: str) -> AdvantageSpec:
    """`ADVANTAGES[name]`; a ValueError naming the closest valid name and listing them all otherwise."""
    return lookup(name, ADVANTAGES, "advantage estimator")  # type: ignore[arg-type]


def compute_advantages(
    name: str, rewards: torch.Tensor, group_size: int, *, scale: str | None = None
) -> torch.Tensor:
    """The advantages of estimator `name` (a key of `ADVANTAGES`): (N·G,) prompt-major rewards -> (N·G,).

    `scale` is GRPO's (see `grpo_advantages`; None = its default, "group"). Any other estimator given a
    scale raises a ValueError rather than ignoring it: Dr. GRPO is GRPO with scale="none", and RLOO and
    REINFORCE++ fix their own normalisation.
    """
    spec = get_advantage(name)
    if group_size < spec.min_group_size:
        raise ValueError(
            f"advantage estimator '{name}' needs group_size >= {spec.min_group_size} completions per prompt, "
            f"got {group_size}"
        )
    params = {} if scale is None else {"scale": scale}
    for key in params:
        if key not in spec.params:
            uses = ", ".join(spec.params) or "no settings"
            raise ValueError(
                f"advantage estimator '{name}' does not use '{key}' (it takes {uses}); '{key}' is GRPO's "
                "(for Dr. GRPO's unscaled advantage, use 'dr_grpo' or grpo with scale='none')"
            )
    return spec.fn(rewards, group_size, **params)


# --- the one loss aggregation ----------------------------------------------------------------------------


def aggregation_units(mask: torch.Tensor, *, mode: str) -> torch.Tensor:
    """What a micro-batch's aggregated loss is a mean over, for `training.step.optimizer_step(units=...)`.

    mask: (B, T). Returns a 0-dim float tensor: the number of completion tokens (`token_mean`) or of
    sequences, B, padding rows included (`sequence_mean`, `constant`). It depends only on the mask, so the
    loop can compute it for every micro-batch before the forward passes, as optimizer_step needs.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation '{mode}'. Valid: {', '.join(AGGREGATIONS)}")
    if mode == "token_mean":
        return mask.sum(dtype=torch.float32)
    return torch.tensor(float(mask.shape[0]), device=mask.device)


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's loss from per-token losses, written once for every online method.

    per_token_loss, mask: (B, T), n_b = Σ_t mask[b, t]. Returns (loss, units): the loss is a mean over
    `units` (`aggregation_units`), so that `training.step.optimizer_step`, which weights micro-batch m by
    units_m / Σ units over every micro-batch and process, yields the same loss and gradient however the
    step's batch is split:

        token_mean     Σ_b Σ_t ℓ / Σ_b n_b,     units = Σ n_b  -> the step's token mean (DAPO §3.3)
        sequence_mean  1/B Σ_b (Σ_t ℓ / n_b),   units = B      -> mean of per-sequence means (GRPO, eq. 3)
        constant       Σ_b Σ_t ℓ / (L · B),     units = B      -> Σ of all tokens / (L · N) (Dr. GRPO)

    L = `max_completion_length`, the generation budget, required by `constant` (unused by the others, and
    no completion may be longer). A sequence with no completion token counts as a sequence with loss 0.
    """
    units = aggregation_units(mask, mode=mode)
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "token_mean":
        loss = masked.sum() / units.clamp(min=1)
    elif mode == "sequence_mean":
        loss = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    else:
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(
                f"loss aggregation 'constant' needs max_completion_length (the generation budget, "
                f"max_new_tokens) >= 1, got {max_completion_length!r}"
            )
        loss = masked.sum() / (max_completion_length * per_token_loss.shape[0])
    return loss, units
