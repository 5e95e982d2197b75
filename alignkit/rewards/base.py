"""The one reward interface, and the helpers every reward source uses.

A reward source turns a batch of (prompt, response) pairs into one float32 number each:

    source.score(prompts, responses) -> torch.Tensor  # (B,) float32, on the CPU
    source.score(prompts, responses, context=ScoreContext(...))  # a source that declares `columns`

A source that reads more than the prompt and the response (a verifier reading the row's `answer`, a Python
function TRL-style reading `completion_ids` or the step) declares `columns`, the row columns it reads (a tuple,
empty when it reads none): it is then called with a `ScoreContext` holding those columns (one value per
response), the completions' token ids, the prompt each response answers and the training step, where the
caller has them. A score of NaN means *no opinion* (a Python reward returning None): the composition leaves
that source out of that row's sum (`rewards.compose`).

A prompt is a text, or a conversation (a list of {"role", "content"} messages: a conversational prompt
row, kept as messages rather than as the policy's rendering of them). A source that reads text (a
template over {prompt}: judges, rules, a classifier's `text`) reads a conversation's content
(`prompt_text`), never the policy's chat markup; a reward model applies its own chat template to the
conversation and the response (`rewards.classifier`).

whatever it runs on inside (a classifier on a GPU, an LLM judge behind HTTP, a lexicon). Scores come
back on the CPU so that sources on different devices compose; a trainer moves the total to its
device. `source.metrics()` returns counters worth logging (judge fallbacks, cache hits), and means over
the rows of the last batch scored as `RowMean`s (a classifier ensemble's uncertainty); rule-based
sources return {}. With several processes each scoring a share of a step, `reduce_metrics` makes them
the whole step's: counts summed, means weighted by rows.

Sources are built from config dicts by `alignkit.rewards.registry` (`build_reward`). This module
imports no other reward module, so every source can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch

from alignkit.config.load import ConfigError
from alignkit.data.chat import render_messages

# A prompt as reward sources get it: a text, or a conversation (a list of {"role", "content"} messages).
Prompt = str | list[dict]


@dataclass(frozen=True)
class RowMean:
    """A source's metric that is a mean over the `rows` it was taken on (e.g. an ensemble's uncertainty on
    the last batch): `reduce_metrics` weights it by them, where a plain number, a count, is summed."""

    value: float
    rows: int

    def __float__(self) -> float:
        return self.value


@dataclass(frozen=True)
class ScoreContext:
    """What a source that declares `columns` may read besides the prompts and responses, one entry per
    response (a prompt's values repeated for each of its completions). Fields a caller does not have are None
    (the `score` command has no token ids; only a training run has a step)."""

    columns: dict[str, list] = field(default_factory=dict)
    """The prompt rows' other columns (e.g. a math problem's `answer`), each a list with one value per
    response."""
    completion_ids: list[list[int]] | None = None
    """The completions' token ids, where a policy sampled them."""
    group_ids: list[int] | None = None
    """For each response, the index of the prompt it answers in this batch: the responses of one prompt (a
    GRPO group) share it."""
    step: int | None = None
    """The training step being scored (0 = the first), in a training run."""
    origins: list[str] | None = None
    """Where each response's row came from, as file:line, for a source's error messages."""
    max_steps: int | None = None
    """The training run's number of steps, in a training run (for a reward that changes over the run)."""

    def __len__(self) -> int:
        lengths = {len(v) for v in self.columns.values()}
        lengths |= {len(v) for v in (self.completion_ids, self.group_ids, self.origins) if v is not None}
        if len(lengths) > 1:
            raise ValueError(f"score context fields of different lengths {sorted(lengths)}")
        return lengths.pop() if lengths else 0

    def select(self, names: tuple[str, ...] | list[str], source: str) -> ScoreContext:
        """This context with only the columns `names` (what `source` declared it reads); a missing one is a
        ValueError naming the source, the column and the columns there are."""
        missing = [n for n in names if n not in self.columns]
        if missing:
            have = ", ".join(sorted(self.columns)) or "none"
            raise ValueError(
                f"reward source '{source}' reads the column(s) {', '.join(missing)}, which the rows lack "
                f"(columns there: {have})"
            )
        return replace(self, columns={n: self.columns[n] for n in names})

    def rows(self, start: int, stop: int) -> ScoreContext:
        """The context of responses start..stop-1 (a batch of a longer list); group ids are kept as they are."""

        def cut(values):
            return None if values is None else values[start:stop]

        return ScoreContext(
            {k: v[start:stop] for k, v in self.columns.items()},
            cut(self.completion_ids),
            cut(self.group_ids),
            self.step,
            cut(self.origins),
            self.max_steps,
        )


@runtime_checkable
class RewardSource(Protocol):
    """Anything that scores (prompt, response) pairs; see the module docstring."""

    name: str
    weight: float

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        """(B,) float32 scores on the CPU, one per (prompt, response) pair (NaN: no opinion). A source with a
        `columns` attribute is called with `context=` (a `ScoreContext`) as well."""
        ...

    def metrics(self) -> dict[str, float | RowMean]:
        """Counters accumulated since the source was built (e.g. judge fallbacks), and `RowMean`s of the
        last batch scored; {} if none."""
        ...


def source_columns(source) -> tuple[str, ...] | None:
    """The row columns `source` reads (its `columns`), or None for a source that reads only prompts and
    responses (and is called without a context)."""
    columns = getattr(source, "columns", None)
    return None if columns is None else tuple(columns)


def score_source(source, prompts: list[Prompt], responses: list[str], context: ScoreContext | None):
    """`source.score(...)`, with the part of `context` it reads when it declares `columns` (a ValueError
    names a column the rows lack; a source that reads columns scored without any context is one too). A
    source with `reads_all_columns` true (a Python function taking `**kwargs`, as TRL passes every column)
    gets every column of the context, its declared `columns` (the ones it cannot do without) checked."""
    columns = source_columns(source)
    if columns is None:
        return source.score(prompts, responses)
    if context is None:
        if columns:
            raise ValueError(
                f"reward source '{source.name}' reads the column(s) {', '.join(columns)}, and this command "
                "passes no row columns to its reward sources"
            )
        context = ScoreContext()
    selected = context.select(columns, source.name)
    if getattr(source, "reads_all_columns", False):
        selected = context
    return source.score(prompts, responses, context=selected)


def row_context(
    rows_columns: list[dict],
    repeat: int = 1,
    *,
    origins: list[str] | None = None,
    completion_ids: list[list[int]] | None = None,
    step: int | None = None,
    max_steps: int | None = None,
) -> ScoreContext:
    """The context of `repeat` responses to each of some prompt rows, prompt-major (a GRPO group's
    completions consecutive, as rollouts lay them out): each row's columns (`PromptRow.columns`) and origin
    (file:line) repeated per response, the response's group the row's index. A column some rows lack is None
    there (the commands check the columns the sources need are in every row before scoring)."""
    names = dict.fromkeys(name for columns in rows_columns for name in columns)
    return ScoreContext(
        {name: [columns.get(name) for columns in rows_columns for _ in range(repeat)] for name in names},
        completion_ids,
        [i for i in range(len(rows_columns)) for _ in range(repeat)],
        step,
        None if origins is None else [o for o in origins for _ in range(repeat)],
        max_steps,
    )


def reduce_metrics(parts: list[dict[str, float | RowMean]]) -> dict[str, float]:
    """Several processes' `metrics()` of one source (each of its share of a step) as one process holding
    every row would report them: counts summed (a key a process lacks counts 0 there), `RowMean`s averaged
    weighted by their rows. Keys in the order they first appear."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        means = [v for v in values if isinstance(v, RowMean)]
        if not means:
            out[key] = float(sum(values))
        elif sum(m.rows for m in means):
            out[key] = sum(m.value * m.rows for m in means) / sum(m.rows for m in means)
    return out


@dataclass
class SourceOptions:
    """Options every reward source has."""

    name: str = ""
    """Name of the source in logs and output columns (default: its type)."""
    weight: float = 1.0
    """Weight of this source in the summed reward."""
    cost_threshold: float | None = None
    """Use the source as a constraint cost kept at or under this value, instead of a reward term."""


def prompt_text(prompt: Prompt) -> str:
    """A prompt as text for sources that read text: a text prompt as it is; a conversation as its content,
    without any model's chat markup: a lone user message's content, else a plain transcript of the turns
    ("System: ...\n\nHuman: ...\n\nAssistant: ...", `data.chat`'s default rendering)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return render_messages(None, prompt, add_generation_prompt=False).lstrip("\n")


def fill(template: str, prompt: Prompt, response: str) -> str:
    """`template` with `{prompt}` (its `prompt_text`) and `{response}` replaced (other braces are left
    alone)."""
    return template.replace("{prompt}", prompt_text(prompt)).replace("{response}", response)


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


def check_batch(prompts: list[Prompt], responses: list[str]) -> None:
    """Raises ValueError unless prompts and responses are equally long lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
