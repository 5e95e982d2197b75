"""`type: python`: a reward function you write, called exactly as TRL's GRPOTrainer calls its reward functions,
so a function written for TRL (`reward_funcs=[fn]`) works unchanged.

    rewards:
      - type: python
        function: examples/rewards/trl_style.py:reward_len   # or "package.module:name"

The function is called once per scored batch, by keyword (TRL's `_calculate_rewards`):

    fn(prompts=[...], completions=[...], completion_ids=[...], trainer_state=state, **columns, **kwargs)

- `prompts`: each completion's prompt, as the row gives it: a text, or a conversation's messages.
- `completions`: each completion: its text for a text row; `[{"role": "assistant", "content": text}]` for a
  conversational row (a row with messages), as TRL gives it.
- `completion_ids`: each completion's token ids as sampled (None where a command has none: `alignkit score`).
- `trainer_state`: an object with `.global_step`, the training step being scored, and `.max_steps`, the run's
  number of steps (both 0 outside a training run), as TRL's `TrainerState` has them.
- every other column of the prompt row (e.g. `solution`, `answer`), each a list with one value per completion
  (a prompt's values repeated for each of its completions), and the source's fixed `kwargs:`.

Each list has one entry per completion, the completions of one prompt consecutive. A function whose
signature takes no `**kwargs` gets only the keywords it names (TRL would pass it every one and fail).

Columns. The columns a function reads are the keyword parameters it names besides the four above: those
without a default are required, checked present in every row before training (file:line); those with a
default are passed where the rows have them. A `**kwargs` function also gets every other column the rows
have (TRL passes them all), but requires none of them: only explicitly named parameters are required. The
`columns:` option lists them instead (each required, and exactly those passed).

Results. The function returns one value per completion: a number (bool counts as 0/1), or None for *no
opinion* (NaN: left out of the weighted sum, and a completion no source scored gets advantage 0 and stays out
of its group's baseline). A list of the wrong length, a value that is not a number or an infinite one, or an
exception inside the function is an error naming the source and the rows (file:line and prompt). An `async
def` function (or one returning an awaitable) is awaited: one event loop per batch (`asyncio.run`), on a
helper thread when the caller already runs a loop (a notebook).

Where the function lives: "package.module:name" is imported (it must be importable: installed, or on
PYTHONPATH), "path/to/file.py:name" is loaded from that file, a relative path being read from the working
directory, as every other path in a config (`data:`, `model:`). A missing file, module or attribute is a
ConfigError saying which, raised when the config is read, before any model loads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config.load import ConfigError
from alignkit.rewards.base import Prompt, ScoreContext, SourceOptions, check_batch

# The keywords TRL passes besides the row's columns; a column of one of these names is not passed.
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


class RewardFunctionError(RuntimeError):
    """A reward function failed, or returned something that is not one score per completion."""


@dataclass(frozen=True)
class TrainerState:
    """What a reward function's `trainer_state` holds here: the part of TRL's `TrainerState` a reward reads."""

    global_step: int = 0
    """The training step being scored (0 = the first; 0 outside a training run)."""
    max_steps: int = 0
    """The run's number of steps (0 outside a training run): `global_step / max_steps` is the run's progress,
    for a reward that changes over it (a curriculum, a length target that tightens)."""


@dataclass
class PythonOptions(SourceOptions):
    """A reward function you write, called as TRL calls reward functions (see alignkit/rewards/python.py)."""

    function: str = ""
    """The function: "package.module:name" or "path/to/file.py:name" (a relative path is read from the
    working directory)."""
    columns: list[str] | None = None
    """The row columns passed to it, each required in every row (default: read from its signature)."""
    kwargs: dict = field(default_factory=dict)
    """Fixed keyword arguments passed on every call, e.g. {tolerance: 0.01}."""


# --- loading ---------------------------------------------------------------------------------------------

_FILE_MODULES: dict[tuple[str, float], object] = {}


def _import_file(path: Path, where: str):
    """The module of a .py file, loaded once per (file, modification time); registered in sys.modules under a
    name of its own (so that pickling and dataclasses inside it work)."""
    resolved = path.resolve()
    key = (str(resolved), resolved.stat().st_mtime)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"alignkit_user_rewards.{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: cannot load {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ConfigError(f"{where}: loading {path} failed: {type(e).__name__}: {e}") from e
    _FILE_MODULES[key] = module
    return module


def load_function(spec: str, where: str, *, default_name: str | None = None) -> Callable:
    """The callable `spec` names: "package.module:name" or "path/to/file.py:name" (relative to the working
    directory); without ":name", `default_name` where given. A ConfigError says what is missing: the file, the
    module or the attribute (listing the callables the module has)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f'{where}: set \'function\' to "package.module:name" or "path/to/file.py:name"')
    location, sep, name = spec.rpartition(":")
    if not sep or not location:
        if default_name is None:
            raise ConfigError(
                f'{where}: function {spec!r} names no function: write "package.module:name" or '
                '"path/to/file.py:name"'
            )
        location, name = spec, default_name
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{where}: function {spec!r}: file not found (looked for {path.resolve()}; a relative path is "
                f"read from the working directory, {Path.cwd()})"
            )
        module = _import_file(path, where)
    else:
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as e:
            if e.name and (location == e.name or location.startswith(e.name + ".")):
                raise ConfigError(
                    f"{where}: function {spec!r}: no module named {e.name!r} (install it or put it on PYTHONPATH; "
                    'a file is written "path/to/file.py:name")'
                ) from e
            raise ConfigError(f"{where}: function {spec!r}: importing {location!r} failed: {e}") from e
        except Exception as e:
            raise ConfigError(
                f"{where}: function {spec!r}: importing {location!r} failed: {type(e).__name__}: {e}"
            ) from e
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(
            f"{where}: function {spec!r}: {location} has no attribute {name!r} (its callables: "
            f"{', '.join(defined) or 'none'})"
        )
    if not callable(fn):
        raise ConfigError(f"{where}: function {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


@dataclass(frozen=True)
class Signature:
    """What a reward function's signature says it takes."""

    accepts: frozenset[str]
    """The keywords it names."""
    required: tuple[str, ...]
    """Its row-column parameters without a default."""
    optional: tuple[str, ...]
    """Its row-column parameters with a default."""
    var_keyword: bool
    """Whether it takes **kwargs (then it gets every keyword)."""


def read_signature(fn: Callable, where: str, fixed: tuple[str, ...] = ()) -> Signature:
    """`fn`'s keyword parameters, split as the module docstring says (the `fixed` kwargs are not columns); a
    positional-only parameter, which no keyword reaches, is a ConfigError."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read the signature of {fn!r}: {e}") from e
    accepts, required, optional, var_keyword = set(), [], [], False
    for p in parameters:
        if p.kind is p.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.kind is p.POSITIONAL_ONLY:
            if p.default is p.empty:
                raise ConfigError(
                    f"{where}: parameter {p.name!r} of {getattr(fn, '__name__', fn)} is positional-only; a "
                    "reward function is called by keyword (prompts=, completions=, ...)"
                )
        else:
            accepts.add(p.name)
            if p.name not in RESERVED and p.name not in fixed:
                (required if p.default is p.empty else optional).append(p.name)
    return Signature(frozenset(accepts), tuple(required), tuple(optional), var_keyword)


# --- calling ---------------------------------------------------------------------------------------------


def run_awaitable(awaitable):
    """The result of an awaitable: `asyncio.run` here, or on a helper thread when this thread already runs an
    event loop (a notebook), where `asyncio.run` is refused."""

    async def wait():
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def where_rows(context: ScoreContext | None, rows: list[int] | range) -> str:
    """The rows `rows` of a batch as a reader finds them: file:line and prompt where the context knows them."""
    out = []
    for i in list(rows)[:5]:
        parts = []
        if context is not None and context.origins is not None:
            parts.append(context.origins[i])
        if context is not None and context.group_ids is not None:
            parts.append(f"prompt {context.group_ids[i]}")
        out.append(f"completion {i}" + (f" ({', '.join(parts)})" if parts else ""))
    more = len(rows) - 5
    return ", ".join(out) + (f" and {more} more" if more > 0 else "")


def as_score_list(values, n: int, source: str, context: ScoreContext | None) -> torch.Tensor:
    """A reward function's result as (n,) float32 scores, None -> NaN (no opinion); a RewardFunctionError
    naming the source and the row for a result that is not one number (or None) per completion."""
    if isinstance(values, torch.Tensor) or hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(
            f"reward source '{source}' returned a {type(values).__name__} (expected a list of {n} numbers or "
            "None, one per completion)"
        )
    if len(values) != n:
        raise RewardFunctionError(
            f"reward source '{source}' returned {len(values)} values for {n} completions (expected one number "
            f"or None per completion, in order; the batch: {where_rows(context, range(n))})"
        )
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise RewardFunctionError(
                f"reward source '{source}' returned {v!r} (a {type(v).__name__}) for "
                f"{where_rows(context, [i])}; expected a number, or None for no opinion"
            )
        v = float(v)
        if math.isinf(v):
            raise RewardFunctionError(
                f"reward source '{source}' returned {v} for {where_rows(context, [i])}; expected a finite number "
                "(None for no opinion)"
            )
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)


def completion_of(prompt: Prompt, text: str):
    """A completion as TRL gives it to reward functions: a conversational row's as one assistant message in a
    list, a text row's as its text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


class PythonReward:
    """A reward function you write (see the module docstring)."""

    def __init__(self, options: PythonOptions):
        self.options, self.name, self.weight = options, options.name, options.weight
        where = f"reward '{options.name}' (python)"
        self.fn = load_function(options.function, where)
        self.signature = read_signature(self.fn, where, tuple(options.kwargs))
        if options.columns is not None:
            self.columns = tuple(options.columns)
            """The columns every row must hold (`rewards.base.score_source`)."""
            self.reads_all_columns = False
        else:
            self.columns = self.signature.required
            # Optional parameters and **kwargs get what the rows have, without requiring it.
            self.reads_all_columns = bool(self.signature.optional) or self.signature.var_keyword

    @staticmethod
    def default_name(options: PythonOptions) -> str | None:
        """The function's own name (TRL names a reward function by its `__name__`)."""
        name = str(options.function).rpartition(":")[2]
        return name or None

    @staticmethod
    def check(options: PythonOptions, where: str) -> None:
        """The function loads, its signature takes the fixed kwargs and the explicit columns, and no fixed
        kwarg shadows a keyword TRL passes."""
        fn = load_function(options.function, where)
        signature = read_signature(fn, where, tuple(options.kwargs))
        fn_name = getattr(fn, "__name__", options.function)
        for key in options.kwargs:
            if key in RESERVED:
                raise ConfigError(f"{where}: kwargs: {key!r} is passed by alignkit itself; rename it")
            if key not in signature.accepts and not signature.var_keyword:
                raise ConfigError(f"{where}: kwargs: {fn_name} takes no parameter {key!r}")
        for column in options.columns or ():
            if column in RESERVED or column in options.kwargs:
                raise ConfigError(
                    f"{where}: columns: {column!r} is not a row column (it is passed otherwise)"
                )
            if column not in signature.accepts and not signature.var_keyword:
                raise ConfigError(f"{where}: columns: {fn_name} takes no parameter {column!r} (nor **kwargs)")

    def call_kwargs(self, prompts: list[Prompt], responses: list[str], context: ScoreContext) -> dict:
        """The keywords of one call (see the module docstring), those the function takes."""
        signature = self.signature
        keywords = {
            "prompts": [[dict(m) for m in p] if isinstance(p, list) else p for p in prompts],
            "completions": [completion_of(p, r) for p, r in zip(prompts, responses)],
            "completion_ids": context.completion_ids,
            "trainer_state": TrainerState(global_step=context.step or 0, max_steps=context.max_steps or 0),
        }
        if self.options.columns is not None:
            names = self.options.columns
        elif signature.var_keyword:
            names = [n for n in context.columns if n not in RESERVED and n not in self.options.kwargs]
        else:
            names = [n for n in (*signature.required, *signature.optional) if n in context.columns]
        keywords.update({n: list(context.columns[n]) for n in names})
        keywords.update(self.options.kwargs)
        if signature.var_keyword:
            return keywords
        return {k: v for k, v in keywords.items() if k in signature.accepts}

    def score(self, prompts: list[Prompt], responses: list[str], context: ScoreContext | None = None):
        """(B,) float32 scores from one call of the function; NaN where it returned None."""
        check_batch(prompts, responses)
        context = context if context is not None else ScoreContext()
        try:
            values = self.fn(**self.call_kwargs(prompts, responses, context))
            if inspect.isawaitable(values):
                values = run_awaitable(values)
        except Exception as e:
            raise RewardFunctionError(
                f"reward source '{self.name}' ({self.options.function}) raised {type(e).__name__}: {e}; "
                f"scoring {len(responses)} completions: {where_rows(context, range(len(responses)))}"
            ) from e
        return as_score_list(values, len(responses), self.name, context)

    def metrics(self) -> dict[str, float]:
        """None: a source's share of no opinions is logged by the composition (`/none`)."""
        return {}
