"""The validated rows the training commands consume, one dataclass per row format: text (chat templates
already applied), plus the file and line each came from.

The input formats a record may take, and how one becomes a row, are in ``alignkit.data.parse``; reading a
whole source into rows, every problem reported at once, in ``alignkit.data.load``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.data.readers import DroppedRow


@dataclass
class PreferenceRow:
    """One validated preference pair, as text (chat templates already applied)."""

    prompt: str
    chosen: str
    rejected: str
    preference: float | None = None
    source: str = ""
    line: int = 0
    prompt_ids: list[int] | None = None
    chosen_ids: list[int] | None = None
    rejected_ids: list[int] | None = None
    margin: float | None = None
    chosen_flagged: bool | None = None
    rejected_flagged: bool | None = None


@dataclass
class SFTRow:
    """One validated supervised example: the loss is taken on ``completion`` only."""

    prompt: str
    completion: str
    source: str = ""
    line: int = 0


@dataclass
class UnpairedRow(SFTRow):
    """One validated unpaired example (KTO): a completion labelled desirable (True) or undesirable."""

    label: bool = True


@dataclass
class LoggedRow(SFTRow):
    """One validated logged example (offline RL): a response and the reward it was given."""

    reward: float = 0.0


@dataclass
class ListwiseRow:
    """One validated list: a prompt, two or more responses, and exactly one of scores, probs or ranking."""

    prompt: str
    responses: list[str]
    scores: list[float] | None = None
    probs: list[float] | None = None
    ranking: list[int] | None = None
    source: str = ""
    line: int = 0


@dataclass
class PreferenceData:
    """Validated preference rows, plus a DroppedRow (``str()``: "file:line: reason") per HH row that did
    not split."""

    rows: list[PreferenceRow]
    dropped: list[DroppedRow] = field(default_factory=list)
