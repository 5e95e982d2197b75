"""alignkit sweep: the Pareto front by hand, metrics read from eval reports, and a two-point sweep of a real
training command, evaluated, written as a table and a plot, and resumed without training again."""

from __future__ import annotations

import json

import pytest

import alignkit.algorithms.online_dpo as online_dpo
from alignkit.config.load import ConfigError
from alignkit.config.tools import SweepConfig
from alignkit.sweep import grid_points, metric, pareto_front, run
from tests.conftest import write_prompts
from tests.test_iterative import E_COUNT


def test_pareto_front_by_hand():
    """x is a cost (min), y a reward (max). (3, 2) is beaten by (2, 3); the two (2, 3) tie and both stay;
    (1, 1) is the cheapest, so nothing dominates it."""
    assert pareto_front([1, 2, 3, 2], [1, 3, 2, 3]) == [True, True, False, True]
    # Both to maximise: (3, 2) and (2, 3) trade off; (1, 1) is beaten by both.
    assert pareto_front([1, 2, 3], [1, 3, 2], "max", "max") == [False, True, True]


def test_grid_points_vary_the_first_key_slowest():
    assert grid_points({"beta": [0.1, 0.2], "lr": [1, 2]}) == [
        {"beta": 0.1, "lr": 1},
        {"beta": 0.1, "lr": 2},
        {"beta": 0.2, "lr": 1},
        {"beta": 0.2, "lr": 2},
    ]


def test_metrics_are_read_from_an_eval_report():
    scores = {
        "aligned": {"mean": 0.5, "stderr": 0.1},
        "difference": 0.2,
        "difference_stderr": 0.05,
        "win_rate": 0.6,
    }
    other = {
        "aligned": {"mean": -1.0, "stderr": 0.2},
        "difference": -0.3,
        "difference_stderr": 0.1,
        "win_rate": 0.4,
    }
    report = {
        "rewards": {"vader": scores, "length": other},
        "total": {
            "aligned": {"mean": 7.0, "stderr": 1.0},
            "difference": 1.5,
            "difference_stderr": 0.5,
            "win_rate": 0.7,
        },
        "kl": {"mean": 0.8, "stderr": 0.02},
        "aligned": {"base_model_perplexity": 21.0, "mean_tokens": 30.0},
    }
    assert metric(report, "reward") == (7.0, 1.0)
    assert metric(report, "rewards/length") == (-1.0, 0.2)
    assert metric(report, "gain/vader") == (0.2, 0.05)
    assert metric(report, "win_rate/length") == (0.4, None)
    assert metric(report, "kl") == (0.8, 0.02)
    assert metric(report, "perplexity") == (21.0, None)
    with pytest.raises(ConfigError, match="no reward source 'toxicity'"):
        metric(report, "reward/toxicity")


def test_a_two_point_sweep_is_trained_evaluated_and_resumed(tmp_path, tiny_model_dir, monkeypatch):
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    held_out = write_prompts(tmp_path / "held_out.jsonl", 4)
    cfg = SweepConfig(
        command="online-dpo",
        settings={
            "model": str(tiny_model_dir),
            "data": data,
            "rewards": E_COUNT,
            "batch_size": 4,
            "num_generations": 2,
            "generation.max_new_tokens": 8,
            "lr": 3e-2,
            "max_steps": 3,
            "progress": False,
            "report": False,
        },
        grid={"beta": [0.05, 0.5]},
        labels=["β 0.05", "β 0.5"],
        eval={"prompts": held_out, "rewards": E_COUNT, "num_samples": 2, "generation.max_new_tokens": 8},
        output_dir=str(tmp_path / "sweep"),
    )
    rows = run(cfg)
    root = tmp_path / "sweep"
    for k, beta in ((1, 0.05), (2, 0.5)):
        assert f"beta: {beta}" in (root / f"point-{k}" / "config.yaml").read_text()
        report = json.loads((root / f"point-{k}" / "eval" / "eval_report.json").read_text())
        assert rows[k - 1]["x"] == report["kl"]["mean"]
        assert rows[k - 1]["y"] == report["rewards"]["regex"]["aligned"]["mean"]
    saved = json.loads((root / "sweep.json").read_text())
    assert [p["pareto"] for p in saved["points"]] == pareto_front(
        [r["x"] for r in rows], [r["y"] for r in rows]
    )
    table = (root / "sweep.md").read_text()
    assert "| β 0.05 |" in table and "| β 0.5 |" in table
    assert (root / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resumed with every point evaluated: nothing trains or samples again, and the frontier is the same.
    monkeypatch.setattr(online_dpo, "train", lambda c: pytest.fail("trained again"))
    import alignkit.evaluation.command as evaluate

    monkeypatch.setattr(evaluate, "run", lambda c: pytest.fail("evaluated again"))
    cfg.resume = True
    assert run(cfg) == rows


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"points": [{"beta": 0.1}], "grid": {}}, "at least 2 points"),
        ({"grid": {"beta": [0.1, 0.2]}}, "either as `points`"),
        ({"x": "kl_divergence"}, "unknown sweep metric"),
        ({"command": "eval"}, "not a training command"),
        ({"eval": {}}, "eval.prompts"),
    ],
)
def test_settings_are_checked_before_anything_runs(tmp_path, overrides, message):
    base = dict(
        command="grpo",
        settings={"model": "m", "data": "d.jsonl", "rewards": [{"type": "vader"}]},
        points=[{"beta": 0.0}, {"beta": 0.1}],
        eval={"prompts": "p.jsonl"},
        output_dir=str(tmp_path / "s"),
    )
    with pytest.raises(ConfigError, match=message):
        run(SweepConfig(**{**base, **overrides}))
