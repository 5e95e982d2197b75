"""Building reward sources from config dicts: the table of source types, and spec validation.

Sources are built from plain dicts, as they appear in a YAML `rewards: [...]` list:

    build_reward({"type": "classifier", "model": "path/to/clf", "label": "POSITIVE", "weight": 0.5})

`type` picks the source (a key of `REWARD_TYPES`); every other key is a field of that type's options
dataclass. An unknown type or key is an error naming the closest valid one.

`REWARD_TYPES` names each source's module and classes rather than importing them: a type's module is
imported the first time a spec of that type is parsed. So a config typo fails before any source module
(and the model or HTTP code it brings) is loaded, and the dependencies run one way: this module and the
sources import `base`, and no source imports this module or another module that imports it.
"""

from __future__ import annotations

import difflib
import importlib

from alignkit.config.load import ConfigError, from_mapping
from alignkit.rewards.base import RewardSource, SourceOptions

__all__ = ["REWARD_TYPES", "build_reward", "build_rewards", "parse_spec", "reward_type", "reward_types"]

# type name -> (module, options dataclass, source class). A new source is a module under
# alignkit/rewards/ with an options dataclass (a subclass of `SourceOptions`) and a source class taking it,
# plus one line here.
REWARD_TYPES: dict[str, tuple[str, str, str]] = {
    "classifier": ("alignkit.rewards.classifier", "ClassifierOptions", "ClassifierReward"),
    "profanity": ("alignkit.rewards.classifier", "ProfanityOptions", "ProfanityReward"),
    "vader": ("alignkit.rewards.rules", "VaderOptions", "VaderReward"),
    "length": ("alignkit.rewards.rules", "LengthOptions", "LengthReward"),
    "regex": ("alignkit.rewards.rules", "RegexOptions", "RegexReward"),
    "judge": ("alignkit.rewards.judge", "JudgeOptions", "JudgeReward"),
    "group_judge": ("alignkit.rewards.group_judge", "GroupJudgeOptions", "GroupJudgeReward"),
    "math_answer": ("alignkit.rewards.verifiable", "MathAnswerOptions", "MathAnswerReward"),
    "exact_match": ("alignkit.rewards.verifiable", "ExactMatchOptions", "ExactMatchReward"),
    "regex_match": ("alignkit.rewards.verifiable", "RegexMatchOptions", "RegexMatchReward"),
    "format": ("alignkit.rewards.verifiable", "FormatOptions", "FormatReward"),
    "remote": ("alignkit.rewards.remote", "RemoteOptions", "RemoteReward"),
    "python": ("alignkit.rewards.python", "PythonOptions", "PythonReward"),
    "verl": ("alignkit.rewards.verl", "VerlOptions", "VerlReward"),
}


def reward_type(kind: str) -> tuple[type[SourceOptions], type]:
    """(options dataclass, source class) of the registered type `kind`, importing its module."""
    module_name, options_name, source_name = REWARD_TYPES[kind]
    module = importlib.import_module(module_name)
    return getattr(module, options_name), getattr(module, source_name)


def reward_types() -> dict[str, tuple[type[SourceOptions], type]]:
    """Every registered type name -> (options dataclass, source class), importing all source modules."""
    return {kind: reward_type(kind) for kind in REWARD_TYPES}


def parse_spec(spec: dict, where: str = "reward") -> tuple[type, SourceOptions]:
    """(source class, validated options) for one spec dict, without building anything heavy."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type")
    if kind is None:
        raise ConfigError(f"{where}: missing 'type' (one of {', '.join(REWARD_TYPES)})")
    if kind not in REWARD_TYPES:
        close = difflib.get_close_matches(str(kind), REWARD_TYPES, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{where}: unknown reward type '{kind}'.{hint} Valid types: {', '.join(REWARD_TYPES)}."
        )
    options_cls, source_cls = reward_type(kind)
    options = from_mapping(options_cls, {k: v for k, v in spec.items() if k != "type"}, where)
    # (A source may name itself, e.g. a Python reward after its function, as TRL does.)
    options.name = options.name or getattr(source_cls, "default_name", lambda _: None)(options) or kind
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
