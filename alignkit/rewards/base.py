"""The one reward interface, and building reward sources from config dicts.

A reward source turns a batch of (prompt, response) strings into one float32 number each:

    source.score(prompts, responses) -> torch.Tensor  # (B,) float32, on the CPU

whatever it runs on inside (a classifier on a GPU, an LLM judge behind HTTP, a lexicon). Scores come
back on the CPU so that sources on different devices compose; a trainer moves the total to its
device. `source.metrics()` returns counters worth logging (judge fallbacks, cache hits); rule-based
sources return {}.

Sources are built from plain dicts, as they appear in a YAML `rewards: [...]` list:

    build_reward({"type": "classifier", "model": "path/to/clf", "label": "POSITIVE", "weight": 0.5})

`type` picks the source (see REWARD_TYPES); every other key is a field of that type's options
dataclass. An unknown type or key is an error naming the closest valid one.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from alignkit.config import ConfigError, from_mapping


@runtime_checkable
class RewardSource(Protocol):
    """Anything that scores (prompt, response) pairs; see the module docstring."""

    name: str
    weight: float

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(B,) float32 scores on the CPU, one per (prompt, response) pair."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counters accumulated since the source was built (e.g. judge fallbacks); {} if none."""
        ...


@dataclass
class SourceOptions:
    """Options every reward source has."""

    name: str = ""
    """Name of the source in logs and output columns (default: its type)."""
    weight: float = 1.0
    """Weight of this source in the summed reward."""
    cost_threshold: float | None = None
    """Use the source as a constraint cost kept at or under this value, instead of a reward term."""


def fill(template: str, prompt: str, response: str) -> str:
    """`template` with `{prompt}` and `{response}` replaced (other braces are left alone)."""
    return template.replace("{prompt}", prompt).replace("{response}", response)


def check_template(template: str, key: str, where: str) -> None:
    """Raises ConfigError unless `template` uses `{prompt}` or `{response}`."""
    if "{prompt}" not in template and "{response}" not in template:
        raise ConfigError(
            f"{where}: '{key}' template {template!r} uses neither {{prompt}} nor {{response}}; "
            "e.g. '{response}' or '{prompt}\\n{response}'"
        )


def as_scores(values, n: int, source: str) -> torch.Tensor:
    """`values` as a (n,) float32 CPU tensor; raises if a source returned the wrong number of scores."""
    scores = torch.as_tensor(values, dtype=torch.float32).detach().reshape(-1).cpu()
    if scores.numel() != n:
        raise ValueError(f"reward source '{source}' returned {scores.numel()} scores for {n} responses")
    return scores


def check_batch(prompts: list[str], responses: list[str]) -> None:
    """Raises ValueError unless prompts and responses are equally long lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


def _reward_types() -> dict[str, tuple[type, type]]:
    """type name -> (options dataclass, source class). Heavy libraries are imported by the sources."""
    from alignkit.rewards.classifier import (
        ClassifierOptions,
        ClassifierReward,
        ProfanityOptions,
        ProfanityReward,
    )
    from alignkit.rewards.judge import JudgeOptions, JudgeReward
    from alignkit.rewards.rules import (
        LengthOptions,
        LengthReward,
        RegexOptions,
        RegexReward,
        VaderOptions,
        VaderReward,
    )

    return {
        "classifier": (ClassifierOptions, ClassifierReward),
        "profanity": (ProfanityOptions, ProfanityReward),
        "vader": (VaderOptions, VaderReward),
        "length": (LengthOptions, LengthReward),
        "regex": (RegexOptions, RegexReward),
        "judge": (JudgeOptions, JudgeReward),
    }


def parse_spec(spec: dict, where: str = "reward") -> tuple[type, SourceOptions]:
    """(source class, validated options) for one spec dict, without building anything heavy."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {spec!r}")
    types = _reward_types()
    kind = spec.get("type")
    if kind is None:
        raise ConfigError(f"{where}: missing 'type' (one of {', '.join(types)})")
    if kind not in types:
        close = difflib.get_close_matches(str(kind), types, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown reward type '{kind}'.{hint} Valid types: {', '.join(types)}.")
    options_cls, source_cls = types[kind]
    options = from_mapping(options_cls, {k: v for k, v in spec.items() if k != "type"}, where)
    options.name = options.name or kind
    if options.cost_threshold is not None and "weight" in spec:
        raise ConfigError(
            f"{where} ({kind}): 'weight' plays no part for a constraint cost (cost_threshold is set): "
            "costs are reported beside the reward, not summed into it; remove one of the two"
        )
    if hasattr(source_cls, "check"):
        source_cls.check(options, f"{where} ({kind})")
    return source_cls, options


def build_reward(spec: dict, where: str = "reward") -> RewardSource:
    """One reward source from its spec dict (see the module docstring)."""
    source_cls, options = parse_spec(spec, where)
    return source_cls(options)


def build_rewards(specs: list[dict], where: str = "rewards") -> list[RewardSource]:
    """Reward sources from a list of spec dicts, all validated before any model is loaded.

    Names must be distinct (two sources of one type need explicit `name`s), since they key the
    output columns and logged metrics.
    """
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"{where}: expected a non-empty list of reward sources, got {specs!r}")
    parsed = [parse_spec(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]
    seen: dict[str, int] = {}
    for i, (_, options) in enumerate(parsed):
        if options.name in seen:
            raise ConfigError(
                f"{where}[{i}]: the name '{options.name}' is already used by {where}[{seen[options.name]}]; "
                "give each source a distinct 'name'"
            )
        seen[options.name] = i
    return [source_cls(options) for source_cls, options in parsed]
