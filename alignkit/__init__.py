"""alignkit: align language models with human and AI preferences.

The Python API runs any command of the CLI from a notebook or a script, with the same configs and checks:

    import alignkit

    result = alignkit.train(
        "dpo", model="alignkit/assets/tinystories-656k", data="alignkit/assets/demo/pairs.jsonl",
        output_dir="runs/dpo", max_steps=20, lr=3e-4,
    )
    result.model      # the saved final model (a folder save_pretrained wrote)
    result.metrics    # the last logged training metrics, e.g. result.metrics["loss"]

    cfg = alignkit.DPOConfig(model=..., data=...)       # or a dict, or a YAML path
    alignkit.train("dpo", cfg, lora={"enabled": True})  # keyword settings override it; cfg is not changed
    alignkit.evaluation.compare(base_model=..., model=result.model, prompts="heldout.json", output_dir="runs/eval")
    alignkit.run("generate", ...)                        # a command that trains nothing returns its result

A Ctrl-C inside `train` checkpoints the last whole step and raises KeyboardInterrupt (the CLI turns it into
exit status 130); `train(..., resume=True)` continues from there. The config classes, reward sets and model
loaders are importable from here too (`alignkit.GRPOConfig`, `alignkit.RewardSet`, `alignkit.load_causal_lm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# name -> "module:attribute", imported on first use (PEP 562), so `import alignkit` stays light
_EXPORTS = {
    **{name: f"alignkit.config.base:{name}" for name in ("TrainConfig", "LoraSettings", "ReferenceSettings")},
    **{
        name: f"alignkit.config.supervised:{name}"
        for name in ("SFTConfig", "RewardConfig", "OfflineRLConfig", "DistillConfig")
    },
    **{
        name: f"alignkit.config.preference:{name}"
        for name in (
            "PreferenceConfig",
            "DPOConfig",
            "KTOConfig",
            "ListwiseConfig",
            "IterativeDPOConfig",
            "DiffusionDPOConfig",
        )
    },
    **{
        name: f"alignkit.config.online:{name}"
        for name in ("OnlineConfig", "GRPOConfig", "RLOOConfig", "PPOConfig", "OnlineDPOConfig")
    },
    **{
        name: f"alignkit.config.tools:{name}"
        for name in ("EvalConfig", "GenerateConfig", "ScoreConfig", "SweepConfig", "ReportConfig")
    },
    "ConfigError": "alignkit.config.load:ConfigError",
    "RunInterrupted": "alignkit.training.loop:RunInterrupted",
    "AlarmStop": "alignkit.training.alarms:AlarmStop",
    "AlarmSettings": "alignkit.config.alarms:AlarmSettings",
    "RewardSet": "alignkit.rewards.compose:RewardSet",
    "build_reward": "alignkit.rewards.registry:build_reward",
    "load_causal_lm": "alignkit.models.load:load_causal_lm",
    "load_tokenizer": "alignkit.models.load:load_tokenizer",
    "load_reward_model": "alignkit.models.reward:load_reward_model",
}

__all__ = ["Result", "evaluate", "make_config", "run", "train", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        from alignkit.commands import resolve

        value = resolve(_EXPORTS[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignkit' has no attribute '{name}'")


@dataclass
class Result:
    """What a training command left: its output folder, the saved model, and its last logged metrics."""

    command: str
    output_dir: Path
    model: Path | None
    """output_dir/final, the saved model (None if the run saved none)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last logged training record of metrics.jsonl (loss, rewards, KL ... with its step)."""
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    """The last logged evaluation record, if the run evaluated."""


def make_config(command: str, source: Any = None, /, **overrides):
    """The validated config `command` would run with: `source` is None (the defaults), a config object
    (copied), a mapping of settings or a YAML path; `overrides` are settings on top (nested as dicts, or
    dotted: `**{"lora.r": 8}`)."""
    from alignkit.commands import COMMANDS
    from alignkit.config.load import build_config

    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown command '{command}'.{hint} Commands: {', '.join(COMMANDS)}")
    return build_config(COMMANDS[command].config_class, source, overrides)


def run(command: str, source: Any = None, /, **overrides):
    """Run any command as `alignkit COMMAND` would (see `make_config` for the arguments). A training command
    returns a `Result`; the others return what they produce (eval: its report, generate: its summary ...)."""
    from alignkit.commands import COMMANDS

    cfg = make_config(command, source, **overrides)
    value = COMMANDS[command].run(cfg)
    if not COMMANDS[command].trains:
        return value
    from alignkit.io import read_jsonl

    output_dir = Path(cfg.output_dir)
    records = read_jsonl(output_dir / "metrics.jsonl").records
    last = {
        split: next((r for r in reversed(records) if r.get("split") == split), {})
        for split in ("train", "eval")
    }
    final = output_dir / "final"
    return Result(command, output_dir, final if final.is_dir() else None, last["train"], last["eval"])


def train(command: str, source: Any = None, /, **overrides) -> Result:
    """Train with `command` (sft, dpo, kto, listwise, reward, grpo, rloo, ppo, online-dpo, iterative-dpo,
    offline-rl, distill, diffusion-dpo) and return its `Result`; see `make_config` for the arguments."""
    from alignkit.commands import COMMANDS

    if command in COMMANDS and not COMMANDS[command].trains:
        raise ValueError(f"'{command}' trains no model: call alignkit.run('{command}', ...)")
    return run(command, source, **overrides)


def evaluate(source: Any = None, /, **overrides) -> dict:
    """`alignkit eval`: base vs aligned model on held-out prompts; returns the report (also written to
    output_dir/eval_report.json and .md)."""
    return run("eval", source, **overrides)
