"""Verifiable rewards (RLVR): a completion checked against its prompt row's reference, or against a layout.

    rewards:
      - {type: math_answer, answer_column: answer}            # 1.0 when the final answer equals the row's
      - {type: exact_match, answer_column: label, extract: final_answer, ignore_case: true}
      - {type: regex_match, answer_column: answer, pattern: '<answer>\\s*{value}\\s*</answer>'}
      - {type: format, layout: think_answer, weight: 0.2}      # <think>...</think><answer>...</answer>

`math_answer`, `exact_match` and `regex_match` read a row column (they declare `columns`, and are called
with a `ScoreContext`, `rewards.base`). A row whose reference is missing, or one math-verify cannot read,
gets NaN, no opinion (the composition leaves the source out of that row's sum), and is counted in
`metrics()`: it is never silently scored as wrong.

`math_answer` finds the completion's final answer (`rewards.answers`: the last \\boxed{...}, else "the
answer is X", else the last number) and asks math-verify (Kydlíček et al., Hugging Face) whether it equals
the reference: 1/2, 0.5 and \\frac{1}{2} are one answer, as are x^2+1 and 1+x^2. math-verify runs in a
worker process of the source's own (`math_worker`), so that its timeout works whichever thread scores, and a
check that hangs costs one item, not the run.
"""

from __future__ import annotations

import importlib.util
import json
import re
import select
import subprocess
import sys
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.load import ConfigError
from alignkit.rewards.answers import final_answer, reference_answer
from alignkit.rewards.base import Prompt, ScoreContext, SourceOptions, as_scores, check_batch
from alignkit.rewards.rules import REGEX_FLAGS

NAN = float("nan")
# Runs math_worker.py as a script (runpy: alignkit/rewards/ is not put on the worker's sys.path, where its
# modules could shadow others); the item timeout is the last argument.
RUN_WORKER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def require_math_verify(where: str) -> None:
    """ConfigError naming the extra to install when the math-verify package is missing."""
    if importlib.util.find_spec("math_verify") is None:
        raise ConfigError(
            f"{where}: math_answer needs the math-verify package, which is not installed; "
            "install it with: pip install 'alignkit[math]'"
        )


class MathChecker:
    """math-verify verdicts (`math_worker.check`) from a worker process, started on first use and again
    after it is killed. Each item gets `timeout` seconds inside the worker (its own alarm) and `grace`
    seconds more here: past that the worker is killed (counted in `restarts`) and the item is a timeout.
    Thread-safe: batches from several threads take turns."""

    def __init__(self, timeout: float, *, grace: float = 10.0, command: list[str] | None = None):
        self.timeout, self.grace = timeout, grace
        worker = str(Path(__file__).with_name("math_worker.py"))
        self.command = command or [sys.executable, "-c", RUN_WORKER, worker, str(timeout)]
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8"
        )
        weakref.finalize(self, proc.kill)  # never outlives the checker (it also ends when stdin closes)
        self.proc = proc
        ready = self._read(60.0 + self.timeout)  # importing sympy takes a second or more
        if ready != {"ready": True}:
            self._stop()
            raise RuntimeError(
                "math_answer: the math-verify worker did not start (its error is printed above); check "
                "that `python -c 'import math_verify'` works"
            )
        return proc

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _read(self, seconds: float) -> dict | None:
        """The worker's next message, or None when it sent none within `seconds` or died."""
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def check(self, items: list[tuple[str, str]]) -> list[str]:
        """The verdict on each (answer, reference) pair: correct, wrong, unparseable, bad_reference,
        timeout or error (`math_worker`)."""
        with self._lock:
            return [self._check_one(answer, reference) for answer, reference in items]

    def _check_one(self, answer: str, reference: str) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"answer": answer, "reference": reference}) + "\n")
            self.proc.stdin.flush()
            reply = self._read(self.timeout + self.grace)
        except (BrokenPipeError, OSError, json.JSONDecodeError):
            reply = None
        if reply is None:  # it hung (inside C, where the alarm cannot stop it) or died: a new one next time
            self._stop()
            self.restarts += 1
            return "timeout"
        return reply["verdict"]


@dataclass
class MathAnswerOptions(SourceOptions):
    """1.0 when the completion's final answer equals the row's reference answer (math-verify), else `wrong`."""

    answer_column: str = "answer"
    """The prompt rows' column holding the reference answer (a number, LaTeX, a GSM8K '#### 42' solution or
    a MATH solution with \\boxed{...})."""
    wrong: float = 0.0
    """Score of a wrong answer, of a completion with no answer found, and of a check that timed out."""
    timeout: float = 5.0
    """Seconds one answer's check may take; past it the answer scores `wrong`, counted as a timeout."""


class MathAnswerReward:
    """A math answer checked against the row's reference; see the module docstring. `metrics()`: scored,
    correct, no_answer (none found), unparseable (math-verify read nothing in it), bad_reference (the row
    got NaN), timeouts, worker_restarts."""

    def __init__(self, options: MathAnswerOptions):
        self.check(options, f"reward '{options.name}'")
        self.options, self.name, self.weight = options, options.name, options.weight
        self.columns = (options.answer_column,)
        self.checker = MathChecker(options.timeout)
        self.counts: Counter = Counter()

    @staticmethod
    def check(options: MathAnswerOptions, where: str) -> None:
        if not options.answer_column:
            raise ConfigError(f"{where}: 'answer_column' is empty; name the rows' reference answer column")
        if options.timeout <= 0:
            raise ConfigError(f"{where}: timeout must be > 0 seconds, got {options.timeout}")
        require_math_verify(where)

    def score(
        self, prompts: list[Prompt], responses: list[str], context: ScoreContext | None = None
    ) -> torch.Tensor:
        """(B,) 1.0 correct, `wrong` otherwise, NaN where the row's reference is missing or unreadable."""
        check_batch(prompts, responses)
        references = _column(context, self.options.answer_column, len(responses), self.name)
        values, todo = [NAN] * len(responses), []
        for i, (response, value) in enumerate(zip(responses, references)):
            reference, answer = reference_answer(value), final_answer(response)
            if reference is None:
                self.counts["bad_reference"] += 1
            elif answer is None:
                self.counts["no_answer"] += 1
                values[i] = self.options.wrong
            else:
                todo.append((i, answer, reference))
        for (i, _, _), verdict in zip(todo, self.checker.check([(a, r) for _, a, r in todo])):
            if verdict == "correct":
                values[i] = 1.0
            elif verdict != "bad_reference":
                values[i] = self.options.wrong
            if verdict != "wrong":
                self.counts[{"timeout": "timeouts", "error": "errors"}.get(verdict, verdict)] += 1
        self.counts["scored"] += len(responses)
        return as_scores(values, len(values), self.name)

    def metrics(self) -> dict[str, float]:
        return {
            **{k: float(v) for k, v in self.counts.items()},
            "worker_restarts": float(self.checker.restarts),
        }


def _column(context: ScoreContext | None, name: str, n: int, source: str) -> list:
    """The column `name` of `context` (one value per response); ValueError when it is not there."""
    if context is None or name not in context.columns:
        raise ValueError(f"reward source '{source}' reads the column '{name}', which it was not given")
    values = context.columns[name]
    if len(values) != n:
        raise ValueError(
            f"reward source '{source}': column '{name}' has {len(values)} values for {n} responses"
        )
    return values


EXTRACTS = ("whole", "final_answer", "regex")


@dataclass
class ExactMatchOptions(SourceOptions):
    """1.0 when (a part of) the completion equals the row's reference text (or one of a list of them), else 0.0."""

    answer_column: str = "answer"
    """The prompt rows' column holding the reference: a text, a number, or a list of accepted texts."""
    extract: str = "whole"
    """What is compared: whole (the completion), final_answer (its \\boxed{}, "answer is" or last number) or
    regex (group 1 of the last match of `pattern`, or the whole match when it has no group)."""
    pattern: str = ""
    """extract=regex: the regular expression (searched, dot matches newline), e.g. '<answer>(.*?)</answer>'."""
    strip: bool = True
    """Compare without the whitespace around either side."""
    ignore_case: bool = False
    """Compare ignoring upper / lower case."""


class ExactMatchReward:
    """Exact string match against a row column. `metrics()`: scored, matched, no_answer (nothing
    extracted: 0.0), no_reference (the row had none: NaN)."""

    def __init__(self, options: ExactMatchOptions):
        self.check(options, f"reward '{options.name}'")
        self.options, self.name, self.weight = options, options.name, options.weight
        self.columns = (options.answer_column,)
        self.regex = re.compile(options.pattern, re.DOTALL) if options.extract == "regex" else None
        self.counts: Counter = Counter()

    @staticmethod
    def check(options: ExactMatchOptions, where: str) -> None:
        if not options.answer_column:
            raise ConfigError(f"{where}: 'answer_column' is empty; name the rows' reference column")
        if options.extract not in EXTRACTS:
            raise ConfigError(f"{where}: extract '{options.extract}' is not one of {', '.join(EXTRACTS)}")
        if (options.extract == "regex") != bool(options.pattern):
            raise ConfigError(
                f"{where}: 'pattern' is for extract: regex, and extract: regex needs one "
                f"(extract is {options.extract}, pattern {options.pattern!r})"
            )
        _compile(options.pattern, re.DOTALL, "pattern", where)

    def _normal(self, text: str) -> str:
        text = text.strip() if self.options.strip else text
        return text.casefold() if self.options.ignore_case else text

    def _part(self, response: str) -> str | None:
        if self.options.extract == "whole":
            return response
        if self.options.extract == "final_answer":
            return final_answer(response)
        matches = list(self.regex.finditer(response))
        if not matches:
            return None
        return matches[-1].group(1) if self.regex.groups else matches[-1].group(0)

    def score(
        self, prompts: list[Prompt], responses: list[str], context: ScoreContext | None = None
    ) -> torch.Tensor:
        """(B,) 1.0 on a match, 0.0 otherwise, NaN where the row has no reference."""
        check_batch(prompts, responses)
        values = []
        for response, reference in zip(
            responses, _column(context, self.options.answer_column, len(responses), self.name)
        ):
            accepted = _texts(reference)
            part = self._part(response)
            if not accepted:
                self.counts["no_reference"] += 1
                values.append(NAN)
            elif part is None:
                self.counts["no_answer"] += 1
                values.append(0.0)
            else:
                matched = self._normal(part) in {self._normal(a) for a in accepted}
                self.counts["matched"] += matched
                values.append(float(matched))
        self.counts["scored"] += len(responses)
        return as_scores(values, len(values), self.name)

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.counts.items()}


def _texts(reference) -> list[str]:
    """A row's reference value as the texts it accepts: a string, a number as written, or a list of them;
    [] for a missing one (None, an empty list)."""
    values = reference if isinstance(reference, (list, tuple)) else [reference]
    return [v if isinstance(v, str) else json.dumps(v) for v in values if v is not None]


def _compile(pattern: str, flags: int, key: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(f"{where}: '{key}' {pattern!r} is not a valid regular expression: {e}") from None


def _flags(letters: str, where: str) -> int:
    bad = [c for c in letters if c not in REGEX_FLAGS]
    if bad:
        raise ConfigError(f"{where}: unknown regex flag '{bad[0]}' (valid: {', '.join(REGEX_FLAGS)})")
    flags = 0
    for letter in letters:
        flags |= REGEX_FLAGS[letter]
    return flags


@dataclass
class RegexMatchOptions(SourceOptions):
    """1.0 when a regular expression built from the row matches the completion, else 0.0."""

    answer_column: str = "answer"
    """The prompt rows' column: the regular expression itself, or (with `pattern`) the text put into it (a
    list: any of them)."""
    pattern: str = ""
    """A regular expression with {value} where the row's value goes, matched literally (escaped), e.g.
    '<answer>\\s*{value}\\s*</answer>'; empty: the row's value is the regular expression."""
    match: str = "search"
    """search (found anywhere in the completion) or fullmatch (the whole completion)."""
    flags: str = ""
    """Letters of re flags: i (ignore case), m (multiline), s (dot matches newline), x (verbose)."""


class RegexMatchReward:
    """A per-row regular expression. `metrics()`: scored, matched, no_reference (the row had none: NaN),
    bad_pattern (the row's expression does not compile: NaN)."""

    def __init__(self, options: RegexMatchOptions):
        self.check(options, f"reward '{options.name}'")
        self.options, self.name, self.weight = options, options.name, options.weight
        self.columns = (options.answer_column,)
        self.flags = _flags(options.flags, self.name)
        self.counts: Counter = Counter()

    @staticmethod
    def check(options: RegexMatchOptions, where: str) -> None:
        if not options.answer_column:
            raise ConfigError(f"{where}: 'answer_column' is empty; name the rows' column")
        if options.match not in ("search", "fullmatch"):
            raise ConfigError(f"{where}: match '{options.match}' is not one of search, fullmatch")
        flags = _flags(options.flags, where)
        if options.pattern:
            if "{value}" not in options.pattern:
                raise ConfigError(
                    f"{where}: 'pattern' {options.pattern!r} has no {{value}} for the row's value; "
                    "for one fixed expression use type: regex"
                )
            _compile(options.pattern.replace("{value}", "x"), flags, "pattern", where)

    def _regex(self, value: str) -> re.Pattern | None:
        text = self.options.pattern.replace("{value}", re.escape(value)) if self.options.pattern else value
        try:
            return re.compile(text, self.flags)  # (re caches compiled expressions)
        except re.error:
            return None

    def score(
        self, prompts: list[Prompt], responses: list[str], context: ScoreContext | None = None
    ) -> torch.Tensor:
        """(B,) 1.0 on a match, 0.0 otherwise, NaN where the row's value is missing or not a valid expression."""
        check_batch(prompts, responses)
        values = []
        for response, value in zip(
            responses, _column(context, self.options.answer_column, len(responses), self.name)
        ):
            regexes = [self._regex(t) for t in _texts(value)]  # a list of expressions: any of them
            if not regexes or None in regexes:
                self.counts["bad_pattern" if regexes else "no_reference"] += 1
                values.append(NAN)
                continue
            full = self.options.match == "fullmatch"
            found = any((r.fullmatch(response) if full else r.search(response)) for r in regexes)
            self.counts["matched"] += found
            values.append(float(found))
        self.counts["scored"] += len(responses)
        return as_scores(values, len(values), self.name)

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.counts.items()}


# A span that holds no opening or closing `tag`: a layout's parts may not nest or repeat their tags.
def _inside(tag: str) -> str:
    return rf"(?:(?!</?{tag}>).)*"


# preset -> (regular expression, matched whole with DOTALL; the tags counted for partial credit)
LAYOUTS = {
    # DeepSeek-R1's (and TRL's / open-r1's format reward): reasoning, then the answer, each tag once
    "think_answer": (
        rf"\s*<think>{_inside('think')}</think>\s*<answer>{_inside('answer')}</answer>\s*",
        ("<think>", "</think>", "<answer>", "</answer>"),
    ),
    # reasoning in <think>, then a non-empty answer in plain text
    "think": (rf"\s*<think>{_inside('think')}</think>\s*(?!\s*$){_inside('think')}", ("<think>", "</think>")),
}


@dataclass
class FormatOptions(SourceOptions):
    """1.0 when the whole completion has the required layout, else 0.0 (or partial credit)."""

    layout: str = "think_answer"
    """think_answer (<think>...</think> then <answer>...</answer>, each once), think (<think>...</think>
    then a non-empty answer), or your own regular expression, matched against the whole completion with
    dot matching newlines."""
    partial: bool = False
    """Presets only: a completion without the layout scores half the share of the preset's tags it holds
    exactly once (at most 0.5, so the layout itself always scores more)."""


class FormatReward:
    """A reward for a layout (DeepSeek-R1's reasoning format). `metrics()`: scored, matched."""

    def __init__(self, options: FormatOptions):
        self.check(options, f"reward '{options.name}'")
        self.options, self.name, self.weight = options, options.name, options.weight
        pattern, self.tags = LAYOUTS.get(options.layout, (options.layout, ()))
        self.regex = re.compile(pattern, re.DOTALL)
        self.counts: Counter = Counter()

    @staticmethod
    def check(options: FormatOptions, where: str) -> None:
        if not options.layout:
            raise ConfigError(
                f"{where}: 'layout' is empty: one of {', '.join(LAYOUTS)}, or a regular expression"
            )
        if options.partial and options.layout not in LAYOUTS:
            raise ConfigError(
                f"{where}: partial credit counts a preset's tags ({', '.join(LAYOUTS)}); your own layout "
                "has none: remove 'partial', or add a second format reward per part"
            )
        _compile(LAYOUTS.get(options.layout, (options.layout,))[0], re.DOTALL, "layout", where)

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        """(B,) 1.0 where the layout matches the whole completion; else 0.0, or with `partial` the tag share / 2."""
        check_batch(prompts, responses)
        values = []
        for response in responses:
            matched = self.regex.fullmatch(response) is not None
            self.counts["matched"] += matched
            if matched or not self.options.partial:
                values.append(float(matched))
            else:
                values.append(sum(response.count(t) == 1 for t in self.tags) / len(self.tags) / 2)
        self.counts["scored"] += len(responses)
        return as_scores(values, len(values), self.name)

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.counts.items()}
