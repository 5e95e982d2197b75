"""Reward functions written as verl's docs write a `custom_reward_function`: called once per completion with the
row's data source, the decoded response, the reference answer and the row's extra information. alignkit calls
them unchanged:

    rewards:
      - type: verl
        function: examples/rewards/verl_style.py         # the name left out: compute_score, as in verl
        ground_truth: answer        # the row column holding the reference (verl's default: reward_model.ground_truth)

Used by examples/python_rewards.yaml and tests/test_python_rewards.py.
"""

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 where the response says the ground truth as a word (the number a story's counting should reach),
    else 0.0; returned as verl allows, a dict with "score" and another key verl logs (the response's words)."""
    words = re.findall(r"[a-z]+", solution_str.lower())
    return {"score": 1.0 if str(ground_truth).lower() in words else 0.0, "words": float(len(words))}


def my_reward_fn(data_source, solution_str, ground_truth, extra_info=None):
    """verl's documentation example, verbatim."""
    return len(solution_str) / 100
