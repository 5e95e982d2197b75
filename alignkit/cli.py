"""One entry point: `alignkit <command> [CONFIG.yaml] [key=value ...]`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.config import (
    ConfigError,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    ListwiseConfig,
    PPOConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
    describe,
    load_config,
)


@dataclass(frozen=True)
class Command:
    """A CLI command: its config class, what it does, and the function that runs it."""

    config: type
    summary: str
    run: Callable
    positional: str | None = None
    """The list field that bare (not key=value) arguments fill, e.g. `alignkit report RUN_DIR ...`."""


def _sft(cfg):
    from alignkit.algorithms.sft import train

    return train(cfg)


def _dpo(cfg):
    if cfg.stages > 1:  # stepwise DPO: one dpo.train per stage
        from alignkit.algorithms.sdpo import train
    else:
        from alignkit.algorithms.dpo import train

    return train(cfg)


def _reward(cfg):
    from alignkit.algorithms.reward_model import train

    return train(cfg)


def _kto(cfg):
    from alignkit.algorithms.kto import train

    return train(cfg)


def _listwise(cfg):
    from alignkit.algorithms.listwise import train

    return train(cfg)


def _demo(cfg):
    from alignkit.demo import run_demo

    return run_demo(cfg)


def _score(cfg):
    from alignkit.rewards.score import run

    return run(cfg)


def _grpo(cfg):
    from alignkit.algorithms.grpo import train

    return train(cfg)


def _ppo(cfg):
    from alignkit.algorithms.ppo import train

    return train(cfg)


def _iterative_dpo(cfg):
    from alignkit.algorithms.iterative import train

    return train(cfg)


def _online_dpo(cfg):
    from alignkit.algorithms.online_dpo import train

    return train(cfg)


def _sweep(cfg):
    from alignkit.sweep import run

    return run(cfg)


def _eval(cfg):
    from alignkit.evaluate import run

    return run(cfg)


def _generate(cfg):
    from alignkit.best_of_n import run

    return run(cfg)


def _report(cfg):
    from alignkit.report import run

    return run(cfg)


def _offline_rl(cfg):
    from alignkit.algorithms.offline_rl import train

    return train(cfg)


def _distill(cfg):
    from alignkit.algorithms.distill import train

    return train(cfg)


def _commands() -> dict[str, Command]:
    from alignkit.algorithms import diffusion_dpo
    from alignkit.algorithms.distill import DistillConfig
    from alignkit.algorithms.iterative import IterativeDPOConfig
    from alignkit.algorithms.offline_rl import OfflineRLConfig
    from alignkit.algorithms.online_dpo import OnlineDPOConfig
    from alignkit.best_of_n import GenerateConfig
    from alignkit.demo import DemoConfig
    from alignkit.evaluate import EvalConfig
    from alignkit.report import ReportConfig
    from alignkit.rewards.score import ScoreConfig
    from alignkit.sweep import SweepConfig

    return {
        "sft": Command(SFTConfig, "supervised fine-tuning on prompt/completion rows", _sft),
        "dpo": Command(DPOConfig, "offline preference optimisation (DPO family) on preference pairs", _dpo),
        "kto": Command(
            KTOConfig, "unpaired preference optimisation (KTO, BCO) on labelled completions", _kto
        ),
        "listwise": Command(
            ListwiseConfig, "listwise preference optimisation on ranked or scored response lists", _listwise
        ),
        "grpo": Command(
            GRPOConfig, "online RL on prompts against a reward set: GRPO, Dr. GRPO, RLOO, REINFORCE++", _grpo
        ),
        "rloo": Command(
            RLOOConfig, "online RL with the RLOO advantage (alignkit grpo advantage=rloo)", _grpo
        ),
        "ppo": Command(
            PPOConfig, "online RL with a critic and a KL-penalised reward (PPO), causal or T5 policies", _ppo
        ),
        "iterative-dpo": Command(
            IterativeDPOConfig,
            "rounds of sample -> score -> pair -> DPO: rejection-sampling (RS-DPO) and iterative DPO",
            _iterative_dpo,
        ),
        "online-dpo": Command(
            OnlineDPOConfig, "online DPO: every step, pairs of the policy's own samples, judged", _online_dpo
        ),
        "diffusion-dpo": Command(
            diffusion_dpo.DiffusionDPOConfig,
            "Diffusion-DPO: align a text-to-image model (Stable Diffusion 1.x/2.x, SDXL) with image preference pairs",
            diffusion_dpo.train,
        ),
        "offline-rl": Command(
            OfflineRLConfig,
            "offline RL on logged rewarded responses: AWR, RAFT, with an optional KL",
            _offline_rl,
        ),
        "distill": Command(
            DistillConfig, "distil an aligned teacher into a student (GKD: forward/reverse KL, JSD)", _distill
        ),
        "reward": Command(
            RewardConfig, "a Bradley–Terry reward model (classifier) from preference pairs", _reward
        ),
        "demo": Command(
            DemoConfig, "offline demo: DPO on AI-feedback pairs makes TinyStories happier, measured", _demo
        ),
        "score": Command(
            ScoreConfig, "score prompt/response rows with reward sources (classifiers, judges, rules)", _score
        ),
        "eval": Command(
            EvalConfig, "base vs aligned model on held-out prompts: rewards, win rate, KL, fluency", _eval
        ),
        "generate": Command(
            GenerateConfig,
            "best-of-n (or ICDPO) sampling: n candidates per prompt, scored, the best kept",
            _generate,
        ),
        "sweep": Command(
            SweepConfig, "one training command at several settings, each evaluated: the Pareto front", _sweep
        ),
        "report": Command(
            ReportConfig,
            "an HTML report (curves, tables, config) of one or more run directories",
            _report,
            "runs",
        ),
    }


USAGE = "usage: alignkit <command> [CONFIG.yaml] [key=value ...]\n       alignkit <command> --help"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the command's config and run it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\ncommands:")
        width = max(map(len, commands))
        for name, cmd in commands.items():
            print(f"  {name:<{width}} {cmd.summary}")
        print("\nSettings come from an optional YAML file, then key=value overrides (dotted for sections).")
        return 0
    name, args = argv[0], argv[1:]
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, commands, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"alignkit: unknown command '{name}'.{hint}\n{USAGE}", file=sys.stderr)
        return 2
    cmd = commands[name]
    if any(a in ("-h", "--help") for a in args):
        shape = f"{cmd.positional.upper()}..." if cmd.positional else "[CONFIG.yaml]"
        print(f"usage: alignkit {name} {shape} [key=value ...]\n\n{cmd.summary}\n\nfields:")
        print(describe(cmd.config))
        return 0
    path = None
    if cmd.positional:  # alignkit report RUN_DIR [RUN_DIR ...] [key=value ...]
        bare = [a for a in args if "=" not in a]
        args = [a for a in args if "=" in a] + ([f"{cmd.positional}={json.dumps(bare)}"] if bare else [])
    elif args and "=" not in args[0]:
        path, args = args[0], args[1:]
    try:
        cfg = load_config(cmd.config, path, args)
    except ConfigError as e:
        print(f"alignkit {name}: {e}", file=sys.stderr)
        return 2
    try:
        cmd.run(cfg)
    except (ValueError, OSError) as e:
        # Data, config and file problems (a model folder or hub name that is not there) carry their own
        # actionable message (file:line, field, path); no traceback.
        print(f"alignkit {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started (the training loops checkpoint their own)
        print(f"\nalignkit {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
