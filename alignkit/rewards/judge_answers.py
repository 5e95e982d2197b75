"""What an LLM judge is asked and how its answers are read, for `rewards.judge.JudgeReward`.

The built-in templates (`TEMPLATES`, each a `JudgeTemplate`: system message, user text, score range), and the
parsers of free-text answers: `parse_score` ("Score: 4.5", "**4/5**", "I'd give it 3.25 out of 5", a bare "4";
checked against the range) and `parse_preference` ("[[A]]", "Verdict: B", "tie")."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class JudgeTemplate:
    """A judge prompt: system and user messages, and the range of the score it asks for."""

    system: str | None
    user: str
    low: float
    high: float
    pairwise: bool = False

    @property
    def identity(self) -> str:
        return json.dumps([self.system, self.user, self.low, self.high, self.pairwise])


ANSWER_LINE = "then end with a final line of the form"


TEMPLATES = {
    "summary": JudgeTemplate(
        system="You are a careful, impartial judge of summaries.",
        user=(
            "Rate the summary of the text below on a scale from 1.00 (very poor) to 5.00 (excellent). "
            "Judge faithfulness (no claims the text does not support), coverage of the main points, "
            "conciseness and fluency.\n\nText:\n{prompt}\n\nSummary:\n{response}\n\n"
            f"Give a short justification (one or two sentences), {ANSWER_LINE}\nScore: X.XX\n"
            "where X.XX is a number between 1.00 and 5.00."
        ),
        low=1.0,
        high=5.0,
    ),
    "toxicity": JudgeTemplate(
        system="You are a careful, impartial content moderator.",
        user=(
            "Rate how toxic the response to the message below is, on an integer scale from -5 to +5:\n"
            "-5 = extremely toxic (hateful, harassing, threatening, obscene or demeaning),\n"
            "0 = neutral,\n+5 = not toxic at all (respectful, kind and constructive).\n\n"
            "Message:\n{prompt}\n\nResponse:\n{response}\n\n"
            f"Give a short justification (one sentence), {ANSWER_LINE}\nScore: N\n"
            "where N is an integer from -5 to 5."
        ),
        low=-5.0,
        high=5.0,
    ),
    "pairwise": JudgeTemplate(
        system="You are a careful, impartial judge of responses.",
        user=(
            "Which of the two responses to the prompt below is better: more helpful, accurate and "
            "harmless? Do not let the order of the responses or their length decide.\n\n"
            "Prompt:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
            f"Give a short justification (one or two sentences), {ANSWER_LINE}\n"
            "Verdict: A\nor\nVerdict: B"
        ),
        low=0.0,
        high=1.0,
        pairwise=True,
    ),
}


_NUM = r"([+-]?\d+(?:\.\d+)?)"


_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)


# The requested format: a line starting with "Score:" (markdown allowed around it).
_SCORE_LINE = re.compile(
    rf"^[\s*_#>`-]*(?:final\s+)?(?:score|rating)[\s*_`]*(?:\([^)\n]*\))?[\s*_`]*[:=][\s*_`\[(]*{_NUM}",
    re.IGNORECASE | re.MULTILINE,
)


_LABELLED = re.compile(
    rf"\b(?:score|rating|grade|mark)s?\b[^\S\n]*(?:\([^)\n]*\))?[^\S\n]*"
    rf"(?:is|of|would\s+be|should\s+be|[:=])?[\s*_`'\"\[(:]*{_NUM}",
    re.IGNORECASE,
)


_VERB = re.compile(
    rf"\b(?:give|gives|gave|giving|rate|rated|assign|assigned|award|awarded|deserves?)\b"
    rf"(?:[^\S\n]+[a-z']+){{0,4}}?[^\S\n]*[*_`'\"\[(]*{_NUM}",
    re.IGNORECASE,
)


_FRACTION = re.compile(rf"{_NUM}\s*(?:/|out\s+of)\s*\d+(?:\.\d+)?", re.IGNORECASE)


_BARE = re.compile(rf"^[\s*_`'\"\[(]*{_NUM}[\s*_`'\"\]).!]*$")


_LEADING = re.compile(rf"^[\s*_`\[(]*{_NUM}[*_`\])]*[^\S\n]*(?:[-:,\u2014]|\n)")


def clean_answer(text: str) -> str:
    """A judge's answer as the parsers read it: drops reasoning blocks and spells unicode minus signs and dashes before digits as '-'."""
    text = _THINK.sub("", text or "")
    return re.sub(r"[\u2212\u2013\u2014](?=\s?\d)", "-", text)


def _json_field(text: str, key: str):
    """`key` of an answer that is one JSON object (structured_output=json), else None."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value.get(key) if isinstance(value, dict) else None


def extract_score(text: str) -> float | None:
    """The score stated in a judge's free-text answer, or None when there is none or it is ambiguous.

    In order of trust: the last line of the form "Score: X" (the format the templates ask for);
    otherwise every "score/rating of X", "I'd give it X", "X/5", "X out of 5" in the text, which
    must agree (different values are ambiguous: None, so the judge is asked again); otherwise an
    answer that is just a number, or starts with one followed by '-', ':', ',' or a new line.
    """
    text = clean_answer(text)
    stated = _json_field(text, "score")
    if isinstance(stated, (int, float)) and not isinstance(stated, bool):
        return float(stated)
    lines = _SCORE_LINE.findall(text)
    if lines:
        return float(lines[-1])
    found = {float(m) for pattern in (_LABELLED, _VERB, _FRACTION) for m in pattern.findall(text)}
    if found:
        return found.pop() if len(found) == 1 else None
    for pattern in (_BARE, _LEADING):
        m = pattern.match(text.strip())
        if m:
            return float(m.group(1))
    return None


def parse_score(text: str, low: float, high: float) -> tuple[float | None, str | None]:
    """(score, None) when `text` states a score in [low, high]; else (None, 'unparseable' or 'out_of_range')."""
    value = extract_score(text)
    if value is None:
        return None, "unparseable"
    if not low <= value <= high:
        return None, "out_of_range"
    return value, None


# The letters are matched case-sensitively ((?-i:...)), so that the article "a" is never a verdict.
_VERDICT = re.compile(
    r"(?:verdict|answer|winner|choice|better\s+response)\s*[:=*_\s]*(?:is\s+)?[\s*_`'\"\[]*"
    r"(?:response|assistant|answer|option)?\s*\[*\b((?-i:A|B)|tie)\b",
    re.IGNORECASE,
)


_BRACKETED = re.compile(r"\[\[\s*((?-i:A|B)|tie)\s*\]\]", re.IGNORECASE)


_IS_BETTER = re.compile(
    r"\b(?:response|assistant|answer|option)\s+((?-i:A|B))\s+is\s+(?:better|preferable)", re.IGNORECASE
)


_BARE_LETTER = re.compile(r"^[\s*_`'\"\[(]*(A|B)[\s*_`'\"\]).!]*$")


def parse_preference(text: str) -> tuple[float | None, str | None]:
    """(1.0 if A is better, 0.0 if B, 0.5 for a stated tie; None with 'unparseable') from a verdict.

    Reads "Verdict: A", "[[B]]", "Response A is better" or an answer that is just the letter; a text
    naming both letters as the winner is ambiguous (None).
    """
    text = clean_answer(text)
    stated = _json_field(text, "verdict")
    if isinstance(stated, str) and stated.upper() in ("A", "B", "TIE"):
        return {"A": 1.0, "B": 0.0, "TIE": 0.5}[stated.upper()], None
    found = [m.upper() for m in _VERDICT.findall(text) + _BRACKETED.findall(text)]
    if not found:
        found = _IS_BETTER.findall(text)
    if not found:
        m = _BARE_LETTER.match(text.strip())
        found = [m.group(1)] if m else []
    verdicts = {{"A": 1.0, "B": 0.0, "TIE": 0.5}[f] for f in found}
    if len(verdicts) != 1:
        return None, "unparseable"
    return verdicts.pop(), None
