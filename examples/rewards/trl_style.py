"""Reward functions written as TRL's docs write them ("Using a custom reward function", GRPOTrainer): each
takes the batch by keyword and returns one float (or None) per completion. alignkit calls them unchanged:

    rewards:
      - type: python
        function: examples/rewards/trl_style.py:reward_len

Used by examples/python_rewards.yaml and tests/test_python_rewards.py.
"""

import asyncio
import re


def reward_len(completions, **kwargs):
    """Prefers completions of 20 characters (TRL's first example, for text rows)."""
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """1.0 where a conversational completion is "<think>...</think><answer>...</answer>" (TRL's example for
    conversational rows: each completion is a list holding one assistant message)."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    """1.0 where the completion contains the row's `ground_truth` column (TRL's example of a reward reading a
    dataset column)."""
    return [1.0 if gt in c else 0.0 for c, gt in zip(completions, ground_truth)]


def solution_reward(prompts, completions, solution, trainer_state, **kwargs):
    """How many of the characters of the row's `solution` the completion contains, ramped in over the first
    steps by `trainer_state.global_step` (a TRL-style curriculum)."""
    ramp = min(1.0, (trainer_state.global_step + 1) / 4)
    return [ramp * sum(ch in c for ch in s) / len(s) for c, s in zip(completions, solution)]


def only_long(completions, **kwargs):
    """No opinion (None) on completions under 12 characters, as TRL lets a reward abstain; else 1.0."""
    return [None if len(c) < 12 else 1.0 for c in completions]


async def async_vowels(completions, **kwargs):
    """The share of vowels, computed as a remote verifier would be awaited (an async reward, as TRL awaits)."""
    await asyncio.sleep(0)
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
