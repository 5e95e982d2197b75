"""A Pareto sweep: one training command at several settings (reward weights, KL coefficients, ...), every
point measured by `alignkit eval` against the same base model, and the frontier of two of the eval's
numbers written as a table and a plot.

    alignkit sweep examples/iterative/sweep_beta.yaml

Point k trains in output_dir/point-k/ (the command's own run: config, metrics, checkpoints, final model)
and is evaluated in output_dir/point-k/eval/ (eval_report.json). The frontier is in output_dir/sweep.json,
sweep.md and sweep.png: a point is on it when no other point is at least as good on both axes and better
on one (`pareto_front`). With resume=true, evaluated points are skipped and an interrupted one continues
from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from alignkit.config.load import ConfigError, from_mapping, load_config, save_config, validate
from alignkit.config.tools import SweepConfig
from alignkit.io import atomic_write
from alignkit.training.rundir import claim_output_dir, part_resume_flags


def grid_points(grid: dict) -> list[dict]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep_points(cfg: SweepConfig) -> list[dict]:
    """The points of `points` or of `grid` (one of them), checked."""
    if bool(cfg.points) == bool(cfg.grid):
        raise ConfigError(
            "give the points either as `points` (a list of settings) or as `grid` (lists of values)"
        )
    points = cfg.points or grid_points(cfg.grid)
    if len(points) < 2:
        raise ConfigError(f"a sweep needs at least 2 points, got {len(points)}")
    if cfg.labels and len(cfg.labels) != len(points):
        raise ConfigError(f"labels: {len(cfg.labels)} given for {len(points)} points")
    return points


def point_config(cfg: SweepConfig, config_class: type, point: dict, output_dir: Path):
    """The command's config for one point: `config`, then `settings`, then the point's settings."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**cfg.settings, **point}.items()]  # JSON is YAML
    overrides.append(f"output_dir={json.dumps(str(output_dir))}")
    return load_config(config_class, cfg.config, overrides)


METRICS = ("reward", "gain", "win_rate", "rewards", "kl", "perplexity", "mean_tokens")


def check_metric_name(name: str) -> None:
    """A frontier axis names one of METRICS (with /SOURCE for the per-source ones), before anything runs."""
    head, slash, source = name.partition("/")
    if head not in METRICS or (
        slash and (not source or head not in ("reward", "gain", "win_rate", "rewards"))
    ):
        raise ConfigError(
            f"unknown sweep metric '{name}' (reward, rewards/NAME, gain, gain/NAME, win_rate, win_rate/NAME, "
            "kl, perplexity, mean_tokens)"
        )


def metric(report: dict, name: str) -> tuple[float, float | None]:
    """(value, standard error or None) of `name` (see SweepConfig.x) in an `alignkit eval` report."""
    sources = report["rewards"]
    composed = report.get("total") or (next(iter(sources.values())) if len(sources) == 1 else None)
    head, _, source = name.partition("/")
    if head in ("reward", "gain", "win_rate"):
        if source and source not in sources:
            raise ConfigError(
                f"'{name}': the eval has no reward source '{source}' (it has {', '.join(sources)})"
            )
        scores = sources[source] if source else composed
        if scores is None:
            raise ConfigError(
                f"'{name}': several sources and no total; name one, e.g. {head}/{next(iter(sources))}"
            )
        if head == "reward":
            return scores["aligned"]["mean"], scores["aligned"]["stderr"]
        if head == "gain":
            return scores["difference"], scores["difference_stderr"]
        return scores["win_rate"], None
    if name == "rewards" or head == "rewards":
        return metric(report, f"reward/{source}")
    if name == "kl":
        return report["kl"]["mean"], report["kl"]["stderr"]
    if name == "perplexity":
        return report["aligned"]["base_model_perplexity"], None
    if name == "mean_tokens":
        return report["aligned"]["mean_tokens"], None
    raise ConfigError(
        f"unknown sweep metric '{name}' (reward, rewards/NAME, gain, gain/NAME, win_rate, win_rate/NAME, kl, "
        "perplexity, mean_tokens)"
    )


def pareto_front(xs: list[float], ys: list[float], x_goal: str = "min", y_goal: str = "max") -> list[bool]:
    """Whether each point is Pareto-optimal: no other point is at least as good on both axes and strictly
    better on one. Points that tie exactly are all on the front."""
    sx, sy = (1 if x_goal == "max" else -1), (1 if y_goal == "max" else -1)
    pts = [(sx * x, sy * y) for x, y in zip(xs, ys)]  # now larger is better on both

    def dominated(i: int) -> bool:
        a = pts[i]
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for j, b in enumerate(pts) if j != i)

    return [not dominated(i) for i in range(len(pts))]


def write_frontier(cfg: SweepConfig, rows: list[dict], root: Path) -> None:
    """sweep.json (every point: label, settings, x, y, standard errors, on the front), sweep.md (the same
    as a table) and sweep.png (the plot, when matplotlib is installed)."""
    from alignkit.report import plots

    front = pareto_front([r["x"] for r in rows], [r["y"] for r in rows], cfg.x_goal, cfg.y_goal)
    for row, on in zip(rows, front):
        row["pareto"] = on
    atomic_write(root / "sweep.json", json.dumps({"x": cfg.x, "y": cfg.y, "points": rows}, indent=1))

    def num(v, se):
        return f"{v:.4g}" + (f" ± {se:.2g}" if se is not None else "")

    table = [
        f"| point | settings | {cfg.x} ({cfg.x_goal}) | {cfg.y} ({cfg.y_goal}) | Pareto |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        settings = json.dumps(r["settings"]).replace("|", "\\|")
        mark = "yes" if r["pareto"] else ""
        table.append(
            f"| {r['label']} | `{settings}` | {num(r['x'], r['x_se'])} | {num(r['y'], r['y_se'])} | {mark} |"
        )
    table.append(
        "\nOn the front by the means; ± is the standard error over prompts (`alignkit eval`), and points whose "
        "intervals overlap on both axes are not told apart by this evaluation."
    )
    atomic_write(root / "sweep.md", "\n".join(table) + "\n")
    print("\n".join(table))
    if plots.available():
        png = plots.frontier(
            f"alignkit sweep: {cfg.command}",
            [r["x"] for r in rows],
            [r["y"] for r in rows],
            [r["label"] for r in rows],
            on_front=front,
            axis_labels=(cfg.x, cfg.y),
            errors=([r["x_se"] for r in rows], [r["y_se"] for r in rows]),
        )
        (root / "sweep.png").write_bytes(png)


def run(cfg: SweepConfig) -> list[dict]:
    """Train and evaluate every point, then write the frontier; returns the points' rows."""
    from alignkit.commands import COMMANDS
    from alignkit.evaluation import command as evaluate

    validate(cfg)
    command = COMMANDS.get(cfg.command)
    if command is None or not (command.trains and command.language_model):
        raise ConfigError(
            f"command '{cfg.command}' is not a training command whose model alignkit eval can compare"
        )
    points = sweep_points(cfg)
    root = Path(cfg.output_dir)
    configs = [
        point_config(cfg, command.config_class, p, root / f"point-{k}") for k, p in enumerate(points, 1)
    ]
    for name in (cfg.x, cfg.y):
        check_metric_name(name)
    if not cfg.eval.get("prompts"):
        raise ConfigError("eval.prompts: the held-out prompts every point is evaluated on")
    if not cfg.resume:  # (resumed, each point's run checks its own folder)
        claim_output_dir(
            root, overwrite=cfg.overwrite, patterns=("point-*", "sweep.json", "sweep.md", "sweep.png")
        )
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)

    rows = []
    for k, (point, run_cfg) in enumerate(zip(points, configs), 1):
        label = cfg.labels[k - 1] if cfg.labels else f"{k}"
        eval_dir = root / f"point-{k}" / "eval"
        report_path = eval_dir / "eval_report.json"
        if not (cfg.resume and report_path.exists()):
            if cfg.resume:
                run_cfg.resume, run_cfg.overwrite = part_resume_flags(run_cfg.output_dir)
            if not (cfg.resume and (Path(run_cfg.output_dir) / "final" / "config.json").exists()):
                print(f"sweep point {k} of {len(points)}: {cfg.command} with {json.dumps(point)}")
                command.run(run_cfg)
            eval_cfg = from_mapping(
                evaluate.EvalConfig,
                {
                    "base_model": run_cfg.model,
                    **cfg.eval,
                    "model": str(Path(run_cfg.output_dir) / "final"),
                    "output_dir": str(eval_dir),
                    "overwrite": True,
                },
                "eval",
            )
            evaluate.run(eval_cfg)
        report = json.loads(report_path.read_text())
        (x, x_se), (y, y_se) = metric(report, cfg.x), metric(report, cfg.y)
        rows.append(
            {"point": k, "label": label, "settings": point, "x": x, "x_se": x_se, "y": y, "y_se": y_se}
        )
    write_frontier(cfg, rows, root)
    return rows
