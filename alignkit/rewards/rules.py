"""Rule-based reward sources: VADER sentiment, length, regular expressions. No model, no network."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from alignkit.config.load import ConfigError
from alignkit.rewards.base import Prompt, SourceOptions, as_scores, check_batch, check_template, fill


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: list[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1] (Hutto & Gilbert 2014)."""
    analyzer = _vader()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


@dataclass
class VaderOptions(SourceOptions):
    """VADER compound sentiment of the text, in [-1, 1] (positive is higher)."""

    text: str = "{response}"
    """What is scored: a template over {prompt} and {response}."""


class VaderReward:
    """Lexicon sentiment (VADER compound): a cheap, transparent reward for 'be more positive'."""

    def __init__(self, options: VaderOptions):
        self.options, self.name, self.weight = options, options.name, options.weight

    @staticmethod
    def check(options: VaderOptions, where: str) -> None:
        check_template(options.text, "text", where)

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        check_batch(prompts, responses)
        texts = [fill(self.options.text, p, r) for p, r in zip(prompts, responses)]
        return as_scores(vader_compound(texts), len(texts), self.name)

    def metrics(self) -> dict[str, float]:
        return {}


@dataclass
class LengthOptions(SourceOptions):
    """Length of the response: `length / scale`, or `-|length - target| / scale` when a target is set."""

    unit: str = "words"
    """What is counted: words (whitespace-separated) or chars."""
    target: float | None = None
    """Length to aim for: the score is then minus the distance to it (none = the length itself)."""
    scale: float = 1.0
    """Divides the length (or distance), e.g. 100 to score in hundreds of words."""


class LengthReward:
    """Response length, raw or as a distance to a target (a length penalty with a negative weight)."""

    def __init__(self, options: LengthOptions):
        self.options, self.name, self.weight = options, options.name, options.weight

    @staticmethod
    def check(options: LengthOptions, where: str) -> None:
        if options.unit not in ("words", "chars"):
            raise ConfigError(f"{where}: unit '{options.unit}' is not one of words, chars")
        if options.scale <= 0:
            raise ConfigError(f"{where}: scale must be > 0, got {options.scale}")

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        check_batch(prompts, responses)
        count = len if self.options.unit == "chars" else (lambda r: len(r.split()))
        lengths = torch.tensor([float(count(r)) for r in responses], dtype=torch.float32)
        if self.options.target is not None:
            lengths = -(lengths - self.options.target).abs()
        return lengths / self.options.scale

    def metrics(self) -> dict[str, float]:
        return {}


REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@dataclass
class RegexOptions(SourceOptions):
    """A regular expression over the text: 1.0 when it is found (else 0.0), or the number of matches."""

    pattern: str = ""
    """Python regular expression, searched for anywhere in the text."""
    flags: str = ""
    """Letters of re flags: i (ignore case), m (multiline), s (dot matches newline), x (verbose)."""
    mode: str = "search"
    """search (1.0 if found, else 0.0), fullmatch (1.0 if the whole text matches) or count (matches)."""
    text: str = "{response}"
    """What is searched: a template over {prompt} and {response}."""


class RegexReward:
    """Format checks and keyword rewards/penalties (a negative weight penalises matches)."""

    def __init__(self, options: RegexOptions):
        self.options, self.name, self.weight = options, options.name, options.weight
        flags = 0
        for letter in options.flags:
            flags |= REGEX_FLAGS[letter]
        self.regex = re.compile(options.pattern, flags)

    @staticmethod
    def check(options: RegexOptions, where: str) -> None:
        if not options.pattern:
            raise ConfigError(f"{where}: 'pattern' is required (a Python regular expression)")
        bad = [c for c in options.flags if c not in REGEX_FLAGS]
        if bad:
            raise ConfigError(f"{where}: unknown regex flag '{bad[0]}' (valid: {', '.join(REGEX_FLAGS)})")
        if options.mode not in ("search", "fullmatch", "count"):
            raise ConfigError(f"{where}: mode '{options.mode}' is not one of search, fullmatch, count")
        check_template(options.text, "text", where)
        try:
            re.compile(options.pattern)
        except re.error as e:
            raise ConfigError(f"{where}: 'pattern' {options.pattern!r} is not a valid regex: {e}") from None

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        check_batch(prompts, responses)
        texts = [fill(self.options.text, p, r) for p, r in zip(prompts, responses)]
        if self.options.mode == "count":
            values = [len(self.regex.findall(t)) for t in texts]
        elif self.options.mode == "fullmatch":
            values = [self.regex.fullmatch(t) is not None for t in texts]
        else:
            values = [self.regex.search(t) is not None for t in texts]
        return as_scores([float(v) for v in values], len(texts), self.name)

    def metrics(self) -> dict[str, float]:
        return {}
