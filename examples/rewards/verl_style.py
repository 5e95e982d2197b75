"""A reward function written as verl's docs write a `custom_reward_function` (e.g. the GSM8K scorer's shape):
called once per completion with the row's data source, the decoded response, the reference answer and the
row's extra information. alignkit calls it unchanged:

    rewards:
      - type: verl
        function: examples/rewards/verl_style.py:compute_score
        ground_truth: answer        # the row column holding the reference (verl's default: reward_model.ground_truth)
"""

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 where the last number of the response is the ground truth, a small format score where the response
    has a number at all, 0.0 otherwise; a dict with "score" and an extra key verl would log."""
    numbers = re.findall(r"-?\d+", solution_str)
    if not numbers:
        return {"score": 0.0, "has_number": 0.0}
    score = 1.0 if numbers[-1] == str(ground_truth).strip() else 0.1
    return {"score": score, "has_number": 1.0}
