"""Experiment trackers (`report_to=tensorboard|wandb`) through accelerate: started with the resolved config
by `training.setup.start_run`, fed by `training.loop.MetricsLogger` with the numbers it writes to metrics.jsonl, closed
by `training.setup.finish_run`.

The run's accelerator is found by its output_dir (`_RUNS`), so every loop that writes metrics through a
MetricsLogger (fit, GRPO, PPO, ...) is tracked without handing the accelerator down to it.

A tracker is never required: report_to=none (the default) imports nothing. TensorBoard writes event files to
output_dir/tensorboard; W&B writes to output_dir/wandb and works without network under WANDB_MODE=offline
(`wandb sync` uploads later).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
_RUNS: dict[Path, object] = {}
"""output_dir (resolved) -> the Accelerator whose trackers log that run, from start to finish."""


def check_report_to(report_to: str) -> bool:
    """Whether `report_to` asks for a tracker; a name that is not one of TRACKERS is an error."""
    if report_to not in TRACKERS:
        raise ValueError(f"report_to '{report_to}' is not one of {', '.join(TRACKERS)}")
    return report_to != "none"


def start_trackers(accelerator, cfg) -> None:
    """Start the `report_to` tracker of an Accelerator made with log_with=cfg.report_to and
    project_dir=cfg.output_dir, logging the resolved config (flattened to dotted keys) as its
    hyper-parameters. TensorBoard: output_dir/tensorboard. W&B: project $WANDB_PROJECT (default alignkit), the
    run named after output_dir, files in output_dir/wandb. A missing package is an error naming it."""
    if not check_report_to(cfg.report_to):
        return
    if not accelerator.log_with:  # accelerate silently drops a tracker whose package is not importable
        package = PACKAGES[cfg.report_to]
        raise ValueError(
            f"report_to={cfg.report_to} needs the {package} package: pip install {package} "
            "(or report_to=none)"
        )
    from alignkit.config.load import config_to_dict, flatten_settings

    # Trackers take scalars and strings only: lists (reward sources, constraints) and None as JSON text.
    hparams = {
        k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
        for k, v in flatten_settings(config_to_dict(cfg))
    }
    if cfg.report_to == "wandb":
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        project = os.environ.get("WANDB_PROJECT", "alignkit")
    else:
        project = "tensorboard"  # accelerate writes TensorBoard events to project_dir/<project>
    run = Path(cfg.output_dir).resolve()
    accelerator.init_trackers(
        project, config=hparams, init_kwargs={"wandb": {"name": run.name, "dir": str(cfg.output_dir)}}
    )
    _RUNS[run] = accelerator


def log_record(output_dir: str | Path, record: dict) -> None:
    """Send one metrics.jsonl record to the trackers of the run writing to output_dir (none: nothing)."""
    accelerator = _RUNS.get(Path(output_dir).resolve())
    if accelerator is not None and accelerator.trackers:
        accelerator.log(tracked_values(record), step=record.get("step"))


def tracked_values(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record under their tracker names: '<split>/<name>' (train/loss,
    eval/rewards/margins), so that train and eval values of one metric are two curves, not one."""
    split = f"{record['split']}/" if "split" in record else ""
    return {
        split + k: v
        for k, v in record.items()
        if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def finish_trackers(accelerator) -> None:
    """Flush and close the run's trackers (not `accelerator.end_training`, which also ends the process
    group that sDPO's next stage still needs)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    for run in [run for run, a in _RUNS.items() if a is accelerator]:
        del _RUNS[run]
