"""A run's report: one self-contained HTML page (inline CSS, figures as base64 PNGs, no network needed)
plus the PNGs, from what the run left on disk (docs/reports.md).

    alignkit report RUN_DIR [RUN_DIR ...] [output_dir=DIR]

It reads metrics.jsonl (every metric: train and eval values of a metric on the same axes, several runs
overlaid), eval_report.json / demo_report.json (before/after and sample tables), config.yaml (the resolved
config, and which settings differ between runs), data_stats.json and dropped_rows.jsonl (rows, truncation,
dropped rows and why). It works on a finished, running or crashed run: a half-written last line of a jsonl
file is skipped and named in the page's notes, never an error. Every training run writes its report when it
ends (`report=true`, `training.setup.finish_run`), as do `alignkit eval` and `alignkit demo`.
"""

from __future__ import annotations

import json
import math
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignkit.config.alarms import ALARMS
from alignkit.config.tools import ReportConfig
from alignkit.io import atomic_write, read_jsonl
from alignkit.report import plots
from alignkit.report.html import page

REPORT_FILE = "report.html"
PLOTS_DIR = "report_plots"
EVAL_REPORTS = ("eval_report", "demo_report")
# Metrics in the order an expert reads them; others follow in the order the run logged them.
METRIC_ORDER = (
    "loss",
    "reward",
    "kl",
    "approx_kl",
    "clip",
    "entropy",
    "explained_variance",
    "logps/",
    "lr",
    "grad_norm",
    "tokens/s",
    "time/",
)
STEP_TIME = ("step_time", "time/step")
ALARM_FLAG, ALARM_STATS = "alarm/", "alarm_stats/"
"""An online run's alarms (`training.alarms`): alarm/<name> 0 or 1 per step, and the figures under
alarm_stats/<name>/. The flags are drawn as marks on every curve and listed, never as curves of their own."""


@dataclass
class Run:
    """What one run directory holds, read leniently."""

    path: Path
    name: str
    records: list[dict] = field(default_factory=list)
    """metrics.jsonl, one dict per readable line."""
    config: dict | None = None
    """config.yaml, parsed."""
    config_text: str = ""
    """config.yaml as written (shown verbatim)."""
    evals: dict[str, dict] = field(default_factory=dict)
    """{'eval_report': {...}, 'demo_report': {...}}: the before/after reports present."""
    dropped: list[dict] = field(default_factory=list)
    """dropped_rows.jsonl: {source, line, reason} per row left out of the run (data.prepare.report_dropped)."""
    data_stats: dict | None = None
    """data_stats.json: {train: {rows, dropped_empty, truncated_prompts, truncated_completions}, eval: ...}."""
    notes: list[str] = field(default_factory=list)
    """What could not be read (a truncated last line, a missing file), shown on the page."""


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read everything a report shows from run directory `path`; a missing piece is simply absent."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a run directory (does not exist or is not a folder)")
    run = Run(path, name or path.resolve().name)
    if (path / "metrics.jsonl").is_file():
        found = read_jsonl(path / "metrics.jsonl")
        run.records = found.records
        run.notes += found.skipped()
    if (path / "config.yaml").is_file():
        run.config_text = (path / "config.yaml").read_text(encoding="utf-8")
        try:
            config = yaml.safe_load(run.config_text) or {}
        except yaml.YAMLError as e:
            config = f"not valid YAML ({e})"
        if isinstance(config, dict):
            run.config = config
        else:
            run.notes.append(f"{path / 'config.yaml'}: not a mapping of settings; shown as text only")
    for stem in EVAL_REPORTS:
        file = path / f"{stem}.json"
        if file.is_file():
            try:
                evaluation = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                evaluation = None  # e.g. being rewritten: eval writes it whole, via a temporary file
            if isinstance(evaluation, dict):
                run.evals[stem] = evaluation
            else:
                run.notes.append(f"{file}: not a JSON object; left out")
    if (path / "dropped_rows.jsonl").is_file():
        found = read_jsonl(path / "dropped_rows.jsonl")
        run.dropped = found.records
        run.notes += found.skipped()
    if (path / "data_stats.json").is_file():
        try:
            stats = json.loads((path / "data_stats.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            stats = None
        if isinstance(stats, dict):
            run.data_stats = stats
        else:
            run.notes.append(f"{path / 'data_stats.json'}: not a JSON object; left out")
    if not run.config_text:  # an `alignkit eval` folder: its settings are in its report
        settings = next((r["config"] for r in run.evals.values() if isinstance(r.get("config"), dict)), None)
        if settings is not None:
            run.config, run.config_text = settings, yaml.safe_dump(settings, sort_keys=False)
    if not run.records and not run.evals:
        run.notes.append(f"{path}: no metrics.jsonl lines and no eval report yet")
    return run


def run_names(paths: list[Path]) -> list[str]:
    """Legend names: each directory's name, with its parent's where two names clash (stage-1 of two sDPO
    runs)."""
    names = [p.resolve().name for p in paths]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]


def is_number(value) -> bool:
    """A finite-or-not int/float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(records: list[dict], metric: str, split: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `metric` in the records of `split` (records without a split count as train)."""
    steps, values = [], []
    for r in records:
        if r.get("split", "train") == split and is_number(r.get(metric)) and is_number(r.get("step")):
            steps.append(r["step"])
            values.append(float(r[metric]))
    return steps, values


def metric_names(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(curves, one-offs): every numeric metric of the runs, in METRIC_ORDER then logged order; a metric
    with a single value in every run and split (a set-up time logged with the first step) is a one-off,
    shown in the summary table rather than as a curve."""
    seen: dict[str, int] = {}
    for run in runs:
        for r in run.records:
            for k, v in r.items():
                if k not in ("step", "split") and is_number(v) and not k.startswith(ALARM_FLAG):
                    seen.setdefault(k, len(seen))

    def rank(name: str) -> tuple[int, int]:
        hits = [i for i, prefix in enumerate(METRIC_ORDER) if name.startswith(prefix)]
        return (hits[0] if hits else len(METRIC_ORDER), seen[name])

    curves, one_offs = [], []
    for name in sorted(seen, key=rank):
        counts = [len(series(run.records, name, s)[0]) for run in runs for s in ("train", "eval")]
        (curves if max(counts) > 1 else one_offs).append(name)
    return curves, one_offs


def summary(run: Run, one_offs: list[str]) -> dict[str, str]:
    """The run's row of the summary table: status, steps, times, throughput and last losses."""
    train = [r for r in run.records if r.get("split", "train") == "train"]
    evals = [r for r in run.records if r.get("split") == "eval"]
    row = {"run": run.name}
    if (run.path / "final").exists():
        row["status"] = "finished (final model saved)"
    elif run.records:
        row["status"] = "no final model yet: running, stopped or crashed"
    else:
        row["status"] = "evaluation" if run.evals else "nothing logged yet"
    row["last step"] = str(max((r["step"] for r in train if is_number(r.get("step"))), default="-"))
    step_times = [r[k] for r in train for k in STEP_TIME if is_number(r.get(k))]
    row["mean step time"] = f"{sum(step_times) / len(step_times):.3g} s" if step_times else "-"
    metrics, config = run.path / "metrics.jsonl", run.path / "config.yaml"
    # From the resolved config (written at the start) to the last metrics line: the run's wall time
    # including loading and set-up, for a crashed run too (not for files copied without their times).
    wall = metrics.stat().st_mtime - config.stat().st_mtime if metrics.is_file() and config.is_file() else -1
    row["wall time"] = duration(wall) if train and wall > 0 else "-"
    rates = [r["tokens/s"] for r in train if is_number(r.get("tokens/s"))]
    row["tokens/s"] = f"{sum(rates) / len(rates):,.0f}" if rates else "-"
    for split, rows in (("train", train), ("eval", evals)):
        losses = [r["loss"] for r in rows if is_number(r.get("loss"))]
        row[f"last {split} loss"] = f"{losses[-1]:.4g}" if losses else "-"
    if any(k.startswith(ALARM_FLAG) for r in train for k in r):  # an online run: its alarms at a glance
        events = alarm_events(run)
        row["alarms"] = ", ".join(f"{e.name} (step {e.steps[0]})" for e in events) if events else "none"
    for name in one_offs:
        values = [r[name] for r in run.records if is_number(r.get(name))]
        row[name] = f"{values[0]:.4g}" if values else "-"
    return row


@dataclass
class AlarmEvent:
    """One alarm of a run: the train steps it fired at, and its figures at the first."""

    name: str
    steps: list[int]
    figures: dict[str, float]
    """alarm_stats/<name>/<figure> at the first step, by figure."""

    def streaks(self) -> list[tuple[int, int]]:
        """The steps as runs of logged consecutive steps, (first, last) each: where the alarm began and ended."""
        out: list[tuple[int, int]] = []
        for step in self.steps:
            if out and step == out[-1][1] + 1:
                out[-1] = (out[-1][0], step)
            else:
                out.append((step, step))
        return out

    def steps_text(self) -> str:
        """'17-20, 25' for the streaks."""
        return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.streaks())


def alarm_events(run: Run) -> list[AlarmEvent]:
    """Every alarm that fired in the run's train lines, in the order it first fired."""
    events: dict[str, AlarmEvent] = {}
    for r in run.records:
        if r.get("split", "train") != "train" or not is_number(r.get("step")):
            continue
        for key, value in r.items():
            if key.startswith(ALARM_FLAG) and is_number(value) and value > 0:
                name = key[len(ALARM_FLAG) :]
                if name not in events:
                    prefix = f"{ALARM_STATS}{name}/"
                    figures = {
                        k[len(prefix) :]: v for k, v in r.items() if k.startswith(prefix) and is_number(v)
                    }
                    events[name] = AlarmEvent(name, [], figures)
                events[name].steps.append(r["step"])
    return sorted(events.values(), key=lambda e: e.steps[0])


def alarm_rows(runs: list[Run]) -> list[list[str]]:
    """The report's alarm table: [run, alarm, steps, figures at the first step, what it means and what to do]."""
    rows = []
    for run in runs:
        for event in alarm_events(run):
            meaning, action = ALARMS.get(event.name, ("", ""))
            figures = ", ".join(f"{k} {v:.4g}" for k, v in event.figures.items())
            rows.append(
                [run.name, event.name, event.steps_text(), figures, f"{meaning}. {action}".strip(". ")]
            )
    return rows


def duration(seconds: float) -> str:
    """'42 s', '3.5 min', '2.1 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def config_differences(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(key, value per run) for every config key whose value differs between the runs (output_dir aside)."""
    from alignkit.config.load import flatten_settings

    if len(runs) < 2 or any(run.config is None for run in runs):
        return []
    flat = [dict(flatten_settings(run.config)) for run in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [
        (k, [json.dumps(f.get(k)) for f in flat])
        for k in keys
        if k != "output_dir" and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
    ]


def file_name(metric: str, taken: set[str]) -> str:
    """A file name for a metric's PNG ('rewards/chosen' -> 'rewards_chosen.png'), unique within `taken`."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") or "metric"
    name, k = f"{stem}.png", 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}.png"
    taken.add(name)
    return name


def figures(runs: list[Run], curves: list[str]) -> tuple[list, list]:
    """(curves, charts): (title, file name, PNG bytes) of every metric's curve, and of a before/after chart
    per eval report."""
    out: list[tuple[str, str, bytes]] = []
    charts: list[tuple[str, str, bytes]] = []
    taken: set[str] = set()
    marks = [  # where each alarm began, on every curve (in the alarm colour; with several runs, in the run's)
        {"step": first, "label": event.name, "color": i if len(runs) > 1 else None}
        for i, run in enumerate(runs)
        for event in alarm_events(run)
        for first, _ in event.streaks()
    ]
    for metric in curves:
        lines = []
        for i, run in enumerate(runs):
            for split in ("train", "eval"):
                steps, values = series(run.records, metric, split)
                if steps:
                    label = f"{run.name} {split}" if len(runs) > 1 else split
                    lines.append(
                        {
                            "label": label,
                            "steps": steps,
                            "values": values,
                            "color": i,
                            "eval": split == "eval",
                        }
                    )
        out.append((metric, file_name(metric, taken), plots.curve(metric, lines, marks=marks)))
    for run in runs:
        for stem, report in run.evals.items():
            rewards = dict(report.get("rewards") or {})
            if "total" in report:
                rewards["total"] = report["total"]
            try:
                base = [(r["base"]["mean"], r["base"].get("stderr")) for r in rewards.values()]
                aligned = [(r["aligned"]["mean"], r["aligned"].get("stderr")) for r in rewards.values()]
            except (KeyError, TypeError):
                continue
            if rewards and all(math.isfinite(m) for m, _ in base + aligned):
                title = f"{run.name}: {stem} mean reward" if len(runs) > 1 else f"{stem}: mean reward"
                png = plots.before_after(title, list(rewards), base, aligned)
                charts.append((title, file_name(f"{run.name}-{stem}", taken), png))
    return out, charts


def default_output_dir(paths: list[Path]) -> Path:
    """One run: its own directory. Several: 'compare' beside the first run."""
    return paths[0] if len(paths) == 1 else paths[0].resolve().parent / "compare"


def write_report(run_dirs: list[str | Path], output_dir: str | Path | None = None) -> tuple[Path, list[str]]:
    """Write output_dir/report.html and output_dir/report_plots/*.png for the runs; returns (page path, notes).

    Without matplotlib the page still holds every table, and a note says what to install for the figures.
    """
    if not run_dirs:
        raise ValueError("no run directory given: alignkit report RUN_DIR [RUN_DIR ...]")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, run_names(paths), strict=True)]
    out = Path(output_dir) if output_dir else default_output_dir(paths)
    curves, one_offs = metric_names(runs)
    notes = [note for run in runs for note in run.notes]
    images, charts = [], []
    if plots.available():
        images, charts = figures(runs, curves)
        plot_dir = out / PLOTS_DIR
        plot_dir.mkdir(parents=True, exist_ok=True)
        for _, name, png in images + charts:
            (plot_dir / name).write_bytes(png)
    elif curves or any(run.evals for run in runs):
        notes.append(plots.MISSING)
    html = page(
        runs,
        summaries=[summary(run, one_offs) for run in runs],
        curves=images,
        charts=charts,
        differences=config_differences(runs),
        notes=notes,
        alarms=alarm_rows(runs),
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    atomic_write(path, html)  # a reader never sees half a page
    return path, notes


def report_after_run(output_dir: str | Path, log=print, *, force: bool = False) -> Path | None:
    """The end-of-run hook: write the run's report unless its saved config says report=false (`force`:
    regardless, for the demo, whose DPO run leaves the report to it). Any failure is a warning: the run it
    reports on is already saved and must not be lost to a report. Returns the page's path, or None."""
    try:
        config = Path(output_dir) / "config.yaml"
        saved = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}) if config.is_file() else {}
        if saved.get("report") is False and not force:
            return None
        path, notes = write_report([output_dir])
    except Exception as e:  # noqa: BLE001 - a report never fails a finished run
        warnings.warn(
            f"the run in {output_dir} is saved, but its report could not be written: {type(e).__name__}: {e} "
            f"(retry with: alignkit report {output_dir})\n{traceback.format_exc(limit=3)}",
            stacklevel=2,
        )
        return None
    if plots.MISSING in notes:
        log(f"report written to {path} (without figures: {plots.MISSING})")
    else:
        log(f"report written to {path}")
    return path


def run(cfg: ReportConfig) -> Path:
    """`alignkit report`: write the page, print its notes and path."""
    path, notes = write_report(cfg.runs, cfg.output_dir or None)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report written to {path}")
    return path
