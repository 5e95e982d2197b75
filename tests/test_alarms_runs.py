"""The alarms in real runs: alarms.stop_on_alarm stops a tiny GRPO run after the step an alarm fired (the CLI
exits 3, the step is checkpointed, the report shows the alarm), and the stopped run resumes to the same lines as
an uninterrupted one; the report draws a fired alarm."""

from __future__ import annotations

import json

import pytest

import alignkit.algorithms.grpo as grpo
from alignkit.cli import main
from alignkit.config.alarms import AlarmSettings
from alignkit.report import build as report
from alignkit.report import plots
from alignkit.training.alarms import AlarmStop
from tests.conftest import train_metrics, write_prompts
from tests.test_grpo import config

# A verifier that never passes: every group of 4 gets 0, 0, 0, 0, so every group has zero reward variance.
NEVER = [{"type": "regex", "pattern": "QQQQQQ", "mode": "count"}]


def tiny(tmp_path, model, data, **overrides):
    settings = dict(rewards=NEVER, batch_size=2, max_steps=6)
    return config(tmp_path, model, data, **{**settings, **overrides})


def same_lines(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        kept = {k: x[k] for k in x if not k.startswith(("time/", "tokens/s"))}
        assert kept == {k: y[k] for k in kept}, x["step"]


def test_stop_on_alarm_stops_after_the_step_it_fired_saved_and_resumable(tmp_path, tiny_model_dir, capsys):
    """The zero-std share is 1 at every step; its alarm reads the mean of the last 3 steps, so it fires at step 3
    (> 0.8). With stop_on_alarm the run stops after step 3: exit status 3, a message naming the alarm and the
    step, checkpoint-3 written, the report listing it. Resumed with the alarm still on, it stops after step 4
    (AlarmStop); resumed with stop_on_alarm=false it runs to the end, and its lines equal an uninterrupted run's,
    alarms included (their history is checkpointed)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    whole = tiny(tmp_path / "whole", tiny_model_dir, data)
    grpo.train(whole)
    expected = train_metrics(whole)
    assert [m["alarm/zero_std_groups"] for m in expected] == [0, 0, 1, 1, 1, 1]

    out = tmp_path / "stopped"
    args = [
        "grpo",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={out}",
        "rewards=[{type: regex, pattern: QQQQQQ, mode: count}]",
        *[f"{k}={v}" for k, v in dict(batch_size=2, num_generations=4, lr=0.01, beta=0.0, seed=1).items()],
        "generation.max_new_tokens=8",
        "max_steps=6",
        "save_steps=0",
        "eval_steps=1000",
        "progress=false",
        "alarms.stop_on_alarm=true",
    ]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "stopped by alarms.stop_on_alarm after step 3" in err and "zero_std_groups: 100% of groups" in err
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and not (out / "final").exists()
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3] and lines[-1]["alarm/zero_std_groups"] == 1
    page = (out / "report.html").read_text()
    assert "<h2>Alarms</h2>" in page and "zero_std_groups" in page and "zero_std_groups (step 3)" in page

    cut = tiny(tmp_path, tiny_model_dir, data, resume=True, alarms=AlarmSettings(stop_on_alarm=True))
    cut.output_dir = str(out)
    with pytest.raises(AlarmStop) as stopped:
        grpo.train(cut)
    assert stopped.value.step == 4 and list(stopped.value.alarms) == ["zero_std_groups"]
    assert stopped.value.checkpoint == out / "checkpoints" / "checkpoint-4"
    cut.alarms = AlarmSettings()  # go on past the alarm: the alarms are not part of what a resume must match
    grpo.train(cut)
    same_lines(expected, train_metrics(cut))
    assert (out / "final").is_dir()


@pytest.mark.skipif(not plots.available(), reason="matplotlib is not installed")
def test_the_report_lists_a_fired_alarm_and_marks_it_on_the_curves(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {
            "step": t,
            "split": "train",
            "reward": 0.1 * t,
            "alarm/length_exploitation": float(t in (4, 5, 7)),
            "alarm_stats/length_exploitation/corr_window": -0.5 - 0.01 * t,
            "alarm/kl_runaway": 0.0,
        }
        for t in range(1, 9)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    real = plots.curve
    monkeypatch.setattr(
        plots, "curve", lambda t, lines, marks=None: drawn.append((t, marks)) or real(t, lines, marks)
    )
    path, _ = report.write_report([run])
    page = path.read_text()
    # Listed once, with its streaks and its figures at the first step; the 0/1 flags are not curves of their own.
    assert "<h2>Alarms</h2>" in page and "4-5, 7" in page and "corr_window -0.54" in page
    assert "the reward pays for length" in page
    assert [t for t, _ in drawn] == ["reward", "alarm_stats/length_exploitation/corr_window"]
    assert drawn[0][1] == [
        {"step": 4, "label": "length_exploitation", "color": None},
        {"step": 7, "label": "length_exploitation", "color": None},
    ]
    assert report.summary(report.load_run(run), [])["alarms"] == "length_exploitation (step 4)"
