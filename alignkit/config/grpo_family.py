"""The `relations` checks of GRPOConfig's DAPO / GDPO / high-entropy settings: each refuses a combination that
would do nothing or nothing sensible, saying why and what to do (docs/online_rl.md, *The GRPO family*)."""

from __future__ import annotations


def dynamic_sampling_relations(cfg) -> str | None:
    """dynamic_sampling needs groups, and its bound is its own."""
    if cfg.dynamic_sampling and cfg.num_generations < 2:
        return (
            f"dynamic_sampling=true with num_generations={cfg.num_generations}: a group of one completion is "
            "always unanimous, so every group would be dropped; sample num_generations >= 2 per prompt"
        )
    if (
        not cfg.dynamic_sampling
        and cfg.dynamic_sampling_max_rollouts != type(cfg).dynamic_sampling_max_rollouts
    ):
        return (
            f"dynamic_sampling_max_rollouts={cfg.dynamic_sampling_max_rollouts} has no effect without "
            "dynamic_sampling=true; set it or remove the bound"
        )
    return None


def overlong_relations(cfg) -> str | None:
    """overlong_cache fits in the generation budget; overlong_weight needs overlong_cache."""
    budget = cfg.generation.max_new_tokens
    if cfg.overlong_cache > budget:
        return (
            f"overlong_cache={cfg.overlong_cache} is longer than the generation budget "
            f"(generation.max_new_tokens={budget}): the penalty ramps over the last overlong_cache tokens of "
            "it; set overlong_cache <= generation.max_new_tokens"
        )
    if cfg.overlong_cache == 0 and cfg.overlong_weight != type(cfg).overlong_weight:
        return (
            f"overlong_weight={cfg.overlong_weight} has no effect with overlong_cache=0 (no overlong penalty); "
            "set overlong_cache > 0 or remove overlong_weight"
        )
    return None


def multi_reward_relations(cfg) -> str | None:
    """multi_reward=normalize_then_sum is the advantage itself, over two or more reward terms."""
    if cfg.multi_reward != "normalize_then_sum":
        return None
    why = "multi_reward=normalize_then_sum"
    terms = len(cfg.rewards) + (cfg.overlong_cache > 0)
    if terms < 2:
        return (
            f"{why} with one reward term: it normalises each reward source within its group before summing "
            "them, which with one source is a group z-score and a batch z-score of the same reward; use "
            "multi_reward=sum (the default), or give two or more rewards"
        )
    if cfg.num_generations < 2:
        return f"{why} z-scores each reward within its group: sample num_generations >= 2 per prompt"
    if cfg.advantage != "grpo" or cfg.scale_rewards != type(cfg).scale_rewards:
        return (
            f"{why} computes the advantage itself (GDPO: the weighted sum of the group z-scores, z-scored over the "
            f"batch), so advantage={cfg.advantage} and scale_rewards={cfg.scale_rewards} would be ignored; use "
            "advantage=grpo with the default scale_rewards, or multi_reward=sum"
        )
    if cfg.reward_normalize:
        return (
            f"reward_normalize=true has no effect with {why}: the group z-score of each source cancels a "
            "running normaliser's shift and scale exactly; remove reward_normalize"
        )
    if cfg.reward_clip is not None:
        return (
            f"reward_clip clips the weighted sum of the sources' scores, which {why} does not use (it sums "
            "their group z-scores); remove reward_clip"
        )
    if cfg.kl_in_reward:
        return (
            f"kl_in_reward=true with {why}: there is no single reward to subtract the KL from before the "
            "advantages; keep the KL in the loss (kl_in_reward=false, grpo's default)"
        )
    return None


GRPO_FAMILY_RELATIONS = (dynamic_sampling_relations, overlong_relations, multi_reward_relations)
"""Every check above, for GRPOConfig.relations."""
