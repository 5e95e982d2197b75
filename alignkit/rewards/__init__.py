"""Everything that turns (prompt, response) into a number: classifiers, LLM judges, rules, and their
composition. See docs/rewards.md.

    from alignkit.rewards import RewardSet
    rewards = RewardSet.from_specs([{"type": "vader"}, {"type": "profanity", "weight": 2.0}])
    out = rewards(prompts, responses)  # out.total (B,), out.scores["vader"] (B,), out.stats
"""

from alignkit.rewards.base import RewardSource, ScoreContext, SourceOptions
from alignkit.rewards.compose import RewardOutput, RewardSet, RunningMeanStd, clip, constraint, weighted_sum
from alignkit.rewards.registry import build_reward, build_rewards

__all__ = [
    "RewardOutput",
    "RewardSet",
    "ScoreContext",
    "RewardSource",
    "RunningMeanStd",
    "SourceOptions",
    "build_reward",
    "build_rewards",
    "clip",
    "constraint",
    "weighted_sum",
]
