"""`type: verl`: a verl-style `compute_score`, called once per completion as verl's reward managers call a
`custom_reward_function`, so a function written for verl works unchanged.

    rewards:
      - type: verl
        function: examples/rewards/verl_style.py:compute_score   # the name may be left out: compute_score
        ground_truth: answer                                      # the row column (default reward_model.ground_truth)

Each completion is scored by

    compute_score(data_source=..., solution_str=completion_text, ground_truth=..., extra_info=..., **kwargs)

with `data_source`, `ground_truth` and `extra_info` read from the prompt row's columns named by the options of
the same names; their defaults are the names verl's RL datasets use (`data_source`, the `ground_truth` key of
the `reward_model` column, `extra_info`). A dotted name reads into a nested mapping. `data_source` and
`ground_truth` are required in every row (checked before training, file:line; `data_source: null` passes
None); `extra_info` is passed where a row has it, else {} (as verl). `kwargs:` are passed on every call
(verl's `custom_reward_function.reward_kwargs`).

`compute_score` returns a number, or a mapping with a "score" (verl logs its other keys; here the numeric
ones are reported as the source's metrics, averaged over the last batch). None is no opinion (NaN), as for
`type: python`; anything else, or an exception inside, is an error naming the source and the row.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

from alignkit.config.load import ConfigError
from alignkit.rewards.base import Prompt, RowMean, ScoreContext, SourceOptions, check_batch
from alignkit.rewards.python import (
    RewardFunctionError,
    as_score_list,
    load_function,
    run_awaitable,
    where_rows,
)


@dataclass
class VerlOptions(SourceOptions):
    """A verl-style compute_score(data_source, solution_str, ground_truth, extra_info) per completion."""

    function: str = ""
    """The function: "path/to/file.py:name" or "package.module:name" (without ":name": compute_score)."""
    data_source: str | None = "data_source"
    """The row column passed as data_source (null: None)."""
    ground_truth: str = "reward_model.ground_truth"
    """The row column passed as ground_truth; a dotted name reads into a nested mapping."""
    extra_info: str = "extra_info"
    """The row column passed as extra_info where a row has it ({} otherwise, as verl)."""
    kwargs: dict = field(default_factory=dict)
    """Fixed keyword arguments passed on every call (verl's reward_kwargs)."""


def read_path(value, path: list[str]):
    """`value[path[0]][path[1]]...`; a KeyError naming the missing key."""
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(key)
        value = value[key]
    return value


class VerlReward:
    """A verl-style `compute_score` (see the module docstring)."""

    reads_all_columns = True  # extra_info is read where the rows have it, not required

    def __init__(self, options: VerlOptions):
        self.options, self.name, self.weight = options, options.name, options.weight
        self.fn = load_function(
            options.function, f"reward '{options.name}' (verl)", default_name="compute_score"
        )
        named = (options.data_source, options.ground_truth)
        self.columns = tuple(dict.fromkeys(n.split(".")[0] for n in named if n))
        """The columns every row must hold: the top-level ones data_source and ground_truth read."""
        self.extras: dict[str, RowMean] = {}

    @staticmethod
    def check(options: VerlOptions, where: str) -> None:
        """The function loads; the column names are not empty."""
        load_function(options.function, where, default_name="compute_score")
        for key in ("ground_truth", "extra_info"):
            if not getattr(options, key):
                raise ConfigError(f"{where}: '{key}' must name a row column")

    def _column(self, context: ScoreContext, name: str | None, i: int, *, default=None, required=True):
        if not name:
            return default
        head, *path = name.split(".")
        if head not in context.columns:
            if required:
                raise RewardFunctionError(f"reward source '{self.name}': the rows have no column {head!r}")
            return default
        try:
            value = read_path(context.columns[head][i], path)
            return default if value is None and not required else value  # (None: a row without it)
        except KeyError as e:
            if not required:
                return default
            raise RewardFunctionError(
                f"reward source '{self.name}': {name!r} has no key {e.args[0]!r} in {where_rows(context, [i])}"
            ) from None

    def score(self, prompts: list[Prompt], responses: list[str], context: ScoreContext | None = None):
        """(B,) float32 scores, one compute_score call per completion."""
        check_batch(prompts, responses)
        context = context if context is not None else ScoreContext()
        o, values, extras = self.options, [], {}
        for i, text in enumerate(responses):
            kwargs = {
                "data_source": self._column(context, o.data_source, i),
                "solution_str": text,
                "ground_truth": self._column(context, o.ground_truth, i),
                "extra_info": self._column(context, o.extra_info, i, default={}, required=False),
                **o.kwargs,
            }
            try:
                value = self.fn(**kwargs)
                if inspect.isawaitable(value):
                    value = run_awaitable(value)
            except Exception as e:
                raise RewardFunctionError(
                    f"reward source '{self.name}' ({o.function}) raised {type(e).__name__}: {e} for "
                    f"{where_rows(context, [i])}"
                ) from e
            if isinstance(value, Mapping):
                if "score" not in value:
                    raise RewardFunctionError(
                        f"reward source '{self.name}' returned a mapping without 'score' (keys {sorted(value)}) "
                        f"for {where_rows(context, [i])}"
                    )
                for key, extra in value.items():
                    if key != "score" and isinstance(extra, (int, float)) and not isinstance(extra, bool):
                        extras.setdefault(key, []).append(float(extra))
                value = value["score"]
            values.append(value)
        self.extras = {k: RowMean(sum(v) / len(v), len(v)) for k, v in extras.items()}
        return as_score_list(values, len(responses), self.name, context)

    def metrics(self) -> dict[str, float | RowMean]:
        """The numeric extra keys of the last batch's results (verl's reward_extra_info), averaged."""
        return dict(self.extras)
