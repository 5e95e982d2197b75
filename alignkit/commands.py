"""The command table: every alignkit command, its config class, the function that runs it, and whether it
trains a model. The CLI (`alignkit.cli`), the Python API (`alignkit.train` / `alignkit.run`) and the sweep
read this one table.

Config classes and runners are named as "module:attribute" and imported when a command is used, so that
`alignkit --help` imports no training code and a command's module never has to import this table back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


def resolve(target: str):
    """The object a "package.module:attribute" string names."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Command:
    """A command: its config class, what it does, the function that runs it, and what it produces."""

    config: str
    """The config class, as "module:Class"."""
    runner: str
    """The function run(config) -> result, as "module:function"."""
    summary: str
    """One line for `alignkit --help`."""
    trains: bool = True
    """Whether it trains a model (saved under output_dir/final); false for eval, score, generate, report..."""
    language_model: bool = True
    """Whether the model it trains is a language model that `alignkit eval` can compare (not diffusion-dpo)."""
    positional: str | None = None
    """The field that bare (not key=value) arguments fill: a list field takes them all (`alignkit report
    RUN_DIR ...`), any other exactly one (`alignkit vllm-serve MODEL`)."""

    @property
    def config_class(self) -> type:
        return resolve(self.config)

    @property
    def run(self) -> Callable:
        return resolve(self.runner)


def run_dpo(cfg):
    """`alignkit dpo`: one DPO run, or stepwise DPO (one run per stage) when stages > 1."""
    if cfg.stages > 1:
        from alignkit.algorithms.sdpo import train
    else:
        from alignkit.algorithms.dpo import train
    return train(cfg)


COMMANDS: dict[str, Command] = {
    "sft": Command(
        "alignkit.config.supervised:SFTConfig",
        "alignkit.algorithms.sft:train",
        "supervised fine-tuning on prompt/completion rows",
    ),
    "dpo": Command(
        "alignkit.config.preference:DPOConfig",
        "alignkit.commands:run_dpo",
        "offline preference optimisation (DPO family) on preference pairs",
    ),
    "kto": Command(
        "alignkit.config.preference:KTOConfig",
        "alignkit.algorithms.kto:train",
        "unpaired preference optimisation (KTO, BCO) on labelled completions",
    ),
    "listwise": Command(
        "alignkit.config.preference:ListwiseConfig",
        "alignkit.algorithms.listwise:train",
        "listwise preference optimisation on ranked or scored response lists",
    ),
    "grpo": Command(
        "alignkit.config.online:GRPOConfig",
        "alignkit.algorithms.grpo:train",
        "online RL on prompts against a reward set: GRPO, Dr. GRPO, RLOO, REINFORCE++",
    ),
    "rloo": Command(
        "alignkit.config.online:RLOOConfig",
        "alignkit.algorithms.grpo:train",
        "online RL with the RLOO advantage (alignkit grpo advantage=rloo)",
    ),
    "ppo": Command(
        "alignkit.config.online:PPOConfig",
        "alignkit.algorithms.ppo:train",
        "online RL with a critic and a KL-penalised reward (PPO), causal or T5 policies",
    ),
    "iterative-dpo": Command(
        "alignkit.config.preference:IterativeDPOConfig",
        "alignkit.algorithms.iterative:train",
        "rounds of sample -> score -> pair -> DPO: rejection-sampling (RS-DPO) and iterative DPO",
    ),
    "online-dpo": Command(
        "alignkit.config.online:OnlineDPOConfig",
        "alignkit.algorithms.online_dpo:train",
        "online DPO: every step, pairs of the policy's own samples, judged",
    ),
    "diffusion-dpo": Command(
        "alignkit.config.preference:DiffusionDPOConfig",
        "alignkit.algorithms.diffusion_dpo:train",
        "Diffusion-DPO: align a text-to-image model (Stable Diffusion 1.x/2.x, SDXL) with image preference pairs",
        language_model=False,
    ),
    "offline-rl": Command(
        "alignkit.config.supervised:OfflineRLConfig",
        "alignkit.algorithms.offline_rl:train",
        "offline RL on logged rewarded responses: AWR, RAFT, with an optional KL",
    ),
    "distill": Command(
        "alignkit.config.supervised:DistillConfig",
        "alignkit.algorithms.distill:train",
        "distil an aligned teacher into a student (GKD: forward/reverse KL, JSD)",
    ),
    "reward": Command(
        "alignkit.config.supervised:RewardConfig",
        "alignkit.algorithms.reward_model:train",
        "a Bradley–Terry reward model (classifier) from preference pairs",
        language_model=False,
    ),
    "demo": Command(
        "alignkit.config.tools:DemoConfig",
        "alignkit.demo:run_demo",
        "offline demo: DPO on AI-feedback pairs makes TinyStories happier, measured",
        trains=False,
    ),
    "score": Command(
        "alignkit.config.tools:ScoreConfig",
        "alignkit.rewards.score:run",
        "score prompt/response rows with reward sources (classifiers, judges, rules)",
        trains=False,
    ),
    "eval": Command(
        "alignkit.config.tools:EvalConfig",
        "alignkit.evaluation.command:run",
        "base vs aligned model on held-out prompts: rewards, win rate, KL, fluency",
        trains=False,
    ),
    "generate": Command(
        "alignkit.config.tools:GenerateConfig",
        "alignkit.inference.best_of_n:run",
        "best-of-n (or ICDPO) sampling: n candidates per prompt, scored, the best kept",
        trains=False,
    ),
    "sweep": Command(
        "alignkit.config.tools:SweepConfig",
        "alignkit.sweep:run",
        "one training command at several settings, each evaluated: the Pareto front",
        trains=False,
    ),
    "vllm-serve": Command(
        "alignkit.config.tools:VLLMServeConfig",
        "alignkit.generation.serve:run",
        "a vLLM server for trainers (generation.vllm.mode=server): they sample from it and push weights to it",
        trains=False,
        positional="model",
    ),
    "report": Command(
        "alignkit.config.tools:ReportConfig",
        "alignkit.report.build:run",
        "an HTML report (curves, tables, config) of one or more run directories",
        trains=False,
        positional="runs",
    ),
}
