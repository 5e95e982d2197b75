"""Run reports: reading what a run left on disk (a crashed run too), the page's tables and figures, the
end-of-run hook, `alignkit report`, experiment trackers, and the page as headless Chromium renders it."""

import html
import importlib.util
import json
import re
import shutil
import struct
import subprocess

import pytest

from alignkit.algorithms import dpo, sft
from alignkit.cli import main
from alignkit.config.preference import DPOConfig
from alignkit.config.supervised import SFTConfig
from alignkit.config.tools import DEMO_MODEL
from alignkit.io import read_jsonl
from alignkit.report import build as report
from alignkit.report import plots

TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_matplotlib = pytest.mark.skipif(not plots.available(), reason="matplotlib is not installed")
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)


def write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def fake_run(root, name, beta, losses, *, eval_every=2, final=True):
    """A run directory as a training command leaves it (metrics, config, data stats, dropped rows)."""
    run = root / name
    run.mkdir(parents=True)
    rows = []
    for step, loss in enumerate(losses, 1):
        rows.append({"step": step, "split": "train", "loss": loss, "lr": 1e-3, "tokens/s": 100.0 * step})
        if step == 1:
            rows[-1]["reference_time"] = 0.25  # a set-up time logged once
        if step % eval_every == 0:
            rows.append({"step": step, "split": "eval", "loss": loss + 0.1, "rewards/margins": 0.1 * step})
    write_jsonl(run / "metrics.jsonl", rows)
    (run / "config.yaml").write_text(
        f"# resolved DPOConfig\nbeta: {beta}\nlr: 0.001\nreport: true\nlora:\n  r: 8\n"
    )
    (run / "data_stats.json").write_text(
        json.dumps({"train": {"rows": 30, "truncated_prompts": 2}, "eval": {"rows": 5}})
    )
    dropped = [{"source": "pairs.jsonl", "line": 3, "reason": "chosen equals rejected"}] * 2
    write_jsonl(
        run / "dropped_rows.jsonl", dropped + [{"source": "pairs.jsonl", "line": 9, "reason": "empty prompt"}]
    )
    if final:
        (run / "final").mkdir()
    return run


def test_a_half_written_last_line_is_skipped_and_named(tmp_path):
    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]
    path = write_jsonl(tmp_path / "metrics.jsonl", rows, tail='{"step": 3, "lo')
    found = read_jsonl(path)
    assert found.records == rows
    assert found.skipped() == [f"{path}:3: truncated last line skipped (the run was writing it)"]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    found = read_jsonl(path)
    assert found.records == [{"step": 1}, {"step": 2}] and found.skipped() == [f"{path}:2: not JSON, skipped"]


def test_unreadable_files_become_notes_not_errors(tmp_path):
    run = fake_run(tmp_path, "run", 0.1, [0.7, 0.6])
    (run / "eval_report.json").write_text('{"rewards": {')  # cut short
    (run / "data_stats.json").write_text("[1, 2]")
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    loaded = report.load_run(run)
    assert loaded.evals == {} and loaded.data_stats is None and loaded.config is None
    assert loaded.notes == [
        f"{run / 'config.yaml'}: not a mapping of settings; shown as text only",
        f"{run / 'eval_report.json'}: not a JSON object; left out",
        f"{run / 'data_stats.json'}: not a JSON object; left out",
    ]
    path, notes = report.write_report([run], tmp_path / "page")
    assert notes == loaded.notes or notes == [*loaded.notes, plots.MISSING]
    assert "- a mapping" in path.read_text()  # the config is still shown as written


def test_metrics_are_ordered_for_reading_and_one_offs_set_apart(tmp_path):
    run = report.load_run(fake_run(tmp_path, "a", 0.1, [0.7, 0.6, 0.5, 0.4]))
    curves, one_offs = report.metric_names([run])
    assert curves == ["loss", "rewards/margins", "lr", "tokens/s"]
    assert one_offs == ["reference_time"]
    assert report.series(run.records, "loss", "eval") == ([2, 4], [pytest.approx(0.7), pytest.approx(0.5)])
    row = report.summary(run, one_offs)
    assert row["last step"] == "4" and row["tokens/s"] == "250" and row["reference_time"] == "0.25"
    assert row["last train loss"] == "0.4" and row["last eval loss"] == "0.5"
    assert row["status"] == "finished (final model saved)"


def test_online_metrics_read_reward_and_kl_first(tmp_path):
    logged = [
        "step_time",
        "frac_eos",
        "time/step",
        "kl_ref",
        "rewards/vader/mean",
        "entropy",
        "loss",
        "reward",
    ]
    records = [{"step": s, "split": "train", **dict.fromkeys(logged, 0.5)} for s in (1, 2)]
    curves, _ = report.metric_names([report.Run(tmp_path, "grpo", records=records)])
    assert curves == [
        "loss",
        "rewards/vader/mean",
        "reward",
        "kl_ref",
        "entropy",
        "time/step",
        "step_time",
        "frac_eos",
    ]


@needs_matplotlib
def test_two_runs_overlay_and_the_page_holds_every_table(tmp_path):
    a = fake_run(tmp_path, "beta-0.1", 0.1, [0.7, 0.6, 0.5, 0.4])
    b = fake_run(tmp_path, "beta-0.5", 0.5, [0.7, 0.65, 0.62], final=False)
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')  # crashed mid-line
    assert main(["report", str(a), str(b), f"output_dir={tmp_path / 'cmp'}"]) == 0
    page = (tmp_path / "cmp" / "report.html").read_text()
    # One figure per curve, each run's train and eval on the same axes, saved beside the page too.
    assert page.count("<img ") == 4
    assert sorted(p.name for p in (tmp_path / "cmp" / "report_plots").iterdir()) == [
        "loss.png",
        "lr.png",
        "rewards_margins.png",
        "tokens_s.png",
    ]
    assert png_size(tmp_path / "cmp" / "report_plots" / "loss.png") == (plots.WIDTH, plots.HEIGHT)
    assert not re.search(r"<link|<script|src=\"(?!data:)", page)  # nothing to fetch: CSS and images inline
    assert f"{b / 'metrics.jsonl'}:5: truncated last line skipped" in page
    assert (
        "no final model yet: running, stopped or crashed" in page and "finished (final model saved)" in page
    )
    # Settings that differ: beta only (output_dir and equal keys are left out).
    diff = page.split('<table class="differences">')[1].split("</table>")[0]
    assert '<td class="text">beta</td><td class="text">0.1</td><td class="text">0.5</td>' in diff
    assert "lora.r" not in diff
    # Dropped rows counted by why, and data statistics.
    assert '<td class="text">chosen equals rejected</td><td class="num">2</td>' in page
    assert '<td class="text">empty prompt</td><td class="num">1</td>' in page
    assert "truncated_prompts" in page


def test_without_matplotlib_the_tables_are_written_and_the_fix_is_named(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path, "run", 0.1, [0.7, 0.6])
    monkeypatch.setattr(plots, "available", lambda: False)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<img" not in page and html.escape(plots.MISSING) in page and "last train loss" in page
    assert plots.MISSING in capsys.readouterr().err


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report"]) == 1
    assert "no run directory given" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope'}: not a run directory" in capsys.readouterr().err


def test_the_hook_respects_report_false_and_never_raises(tmp_path, monkeypatch):
    run = fake_run(tmp_path, "run", 0.1, [0.7, 0.6])
    (run / "config.yaml").write_text("report: false\n")
    assert report.report_after_run(run) is None and not (run / "report.html").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.warns(
        UserWarning, match=r"is saved, but its report could not be written: RuntimeError: disk full"
    ):
        assert report.report_after_run(run, force=True) is None


def two_step_sft(tmp_path, model, **overrides) -> SFTConfig:
    """Two SFT steps on four rows into tmp_path/o."""
    data = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"{n} said", "completion": " hi."} for n in "abcd"]
    )
    settings = dict(batch_size=2, max_steps=2, progress=False, save_steps=0, **overrides)
    return SFTConfig(model=str(model), data=str(data), output_dir=str(tmp_path / "o"), **settings)


def test_a_failing_report_does_not_lose_the_trained_model(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(report, "write_report", lambda *a, **k: 1 / 0)
    with pytest.warns(UserWarning, match="ZeroDivisionError"):
        final = sft.train(two_step_sft(tmp_path, tiny_model_dir))
    assert (final / "model.safetensors").exists() and not (tmp_path / "o" / "report.html").exists()


# ---------------------------------------------------------------------------------------------------
# A real run: DPO with a TensorBoard tracker, then `alignkit eval` into the same folder.


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("report-run")
    words = ["happy", "kind", "sad", "cold"]
    rows = [
        {
            "prompt": f"Tom {i} was",
            "chosen": f" {words[i % 2]} today.",
            "rejected": f" {words[2 + i % 2]} today.",
        }
        for i in range(24)
    ]
    data = write_jsonl(root / "pairs.jsonl", rows)
    out = root / "run"
    cfg = DPOConfig(
        model=str(tiny_model_dir),
        data=str(data),
        output_dir=str(out),
        batch_size=4,
        lr=1e-3,
        max_length=48,
        max_prompt_length=24,
        max_steps=4,
        eval_fraction=0.25,
        eval_steps=2,
        warmup_ratio=0.0,
        progress=False,
        save_steps=0,
        report_to="tensorboard" if TENSORBOARD else "none",
    )
    dpo.train(cfg)
    first_page = (out / "report.html").read_text()
    prompts = write_jsonl(
        root / "prompts.jsonl", [{"prompt": "Once upon a time"}, {"prompt": "Lily & Tom <3"}]
    )
    args = [f"base_model={DEMO_MODEL}", f"model={out / 'final'}", f"prompts={prompts}", f"output_dir={out}"]
    assert main(["eval", *args, "num_samples=2", "generation.max_new_tokens=6", "num_examples=2"]) == 0
    return out, first_page


@needs_matplotlib
def test_a_training_run_ends_with_its_report(trained_run):
    out, first_page = trained_run
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = {
        k for m in metrics for k, v in m.items() if k not in ("step", "split") and isinstance(v, (int, float))
    }
    # a curve for every metric logged more than once in a split; a one-off (set-up time) is a table cell
    curves = [
        k
        for k in names
        if max(sum(k in m for m in metrics if m["split"] == s) for s in ("train", "eval")) > 1
    ]
    assert first_page.count("<img ") == len(curves) >= 10
    pngs = {p.name for p in (out / "report_plots").iterdir()}
    assert {"loss.png", "rewards_margins.png", "rewards_accuracies.png", "grad_norm.png", "lr.png"} <= pngs
    assert "finished (final model saved)" in first_page and "Before and after" not in first_page
    data_stats = json.loads((out / "data_stats.json").read_text())
    assert data_stats["train"]["rows"] == 18 and data_stats["eval"]["rows"] == 6


@needs_matplotlib
def test_eval_rewrites_the_report_with_before_and_after(trained_run):
    out, _ = trained_run
    page = (out / "report.html").read_text()
    result = json.loads((out / "eval_report.json").read_text())
    vader = result["rewards"]["vader"]
    assert f'<td class="text">vader</td><td class="num">{vader["base"]["mean"]:+.3f} ± ' in page
    assert html.escape(result["examples"][1]["prompt"]) in page  # "Lily &amp; Tom &lt;3"
    assert "eval_report: mean reward" in page and (out / "report_plots" / "run-eval_report.png").exists()


@pytest.mark.skipif(not TENSORBOARD, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_holds_the_metrics_jsonl_values(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for split, name in (("train", "loss"), ("train", "rewards/margins"), ("train", "lr"), ("eval", "loss")):
        logged = [(m["step"], m[name]) for m in metrics if m["split"] == split]
        read = [(e.step, e.value) for e in events.Scalars(f"{split}/{name}")]
        assert [s for s, _ in read] == [s for s, _ in logged]
        assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6, abs=1e-9)
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


def test_report_to_is_checked_and_a_missing_tracker_package_is_named(tmp_path, monkeypatch):
    from alignkit.training.tracking import check_report_to, start_trackers

    with pytest.raises(ValueError, match="report_to 'tensorbord' is not one of none, tensorboard, wandb"):
        check_report_to("tensorbord")
    cfg = DPOConfig(output_dir=str(tmp_path), report_to="wandb")

    class NoTracker:  # what accelerate leaves when the package cannot be imported
        log_with = []

    with pytest.raises(ValueError, match="report_to=wandb needs the wandb package: pip install wandb"):
        start_trackers(NoTracker(), cfg)


def test_wandb_offline_run_writes_its_files_without_network(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sft.train(two_step_sft(tmp_path, tiny_model_dir, report_to="wandb", report=False))
    (path,) = (tmp_path / "o" / "wandb").glob("offline-run-*/*.wandb")
    history = wandb_history(path)
    metrics = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [int(h["_step"]) for h in history] == [m["step"] for m in metrics] == [1, 2]
    for name in ("loss", "grad_norm", "lr", "tokens/s"):
        assert [float(h[f"train/{name}"]) for h in history] == [m[name] for m in metrics]


def wandb_history(path) -> list[dict]:
    """The history rows ({name: JSON text}) of an offline W&B run file: a 7-byte W&B header, then
    LevelDB-log records (7-byte header: crc, length, type; FULL=1 / FIRST, MIDDLE, LAST=4) in 32 KiB
    blocks, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


# ---------------------------------------------------------------------------------------------------
# The page in a real browser.

PROBE = """<script>
window.addEventListener("load", () => {
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify([...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight]));
  document.body.appendChild(probe);
});
</script>"""


def chromium(*args, timeout=90) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@needs_matplotlib
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH (apt-get install chromium)")
def test_headless_chromium_renders_the_plots_and_tables(trained_run, tmp_path):
    import numpy as np
    from PIL import Image

    out, _ = trained_run
    page = (out / "report.html").read_text()
    expected = re.findall(r'<img [^>]*alt="([^"]+)"', page)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))

    dom = chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    sizes = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert [alt for alt, _, _ in sizes] == [html.unescape(a) for a in expected] and len(sizes) >= 10
    assert all((w, h) == (plots.WIDTH, plots.HEIGHT) for _, w, h in sizes)  # decoded, at their size
    for text in (
        "Training curves",
        "Rewards before and after",
        "Fluency and KL",
        "Samples",
        "Resolved config",
    ):
        assert text in dom
    assert html.escape(json.loads((out / "eval_report.json").read_text())["examples"][0]["aligned"]) in dom

    shot = tmp_path / "shot.png"
    chromium("--window-size=1100,1400", f"--screenshot={shot}", (out / "report.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)  # (H, W, 3)
    assert pixels.shape == (1400, 1100, 3)
    # matplotlib's first colour (#1f77b4) draws the curves: thousands of its pixels mean the plots are
    # on screen, not blank boxes or broken-image icons.
    blue = (np.abs(pixels - np.array([31, 119, 180])) < 40).all(axis=2).sum()
    assert blue > 2000
    assert pixels.mean(axis=2).std() > 20  # not a blank page
