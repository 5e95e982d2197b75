"""Finding the final answer in a completion (and in a reference answer), for the verifiable rewards.

    final_answer(r"... so the area is \\boxed{\\frac{1}{2}}.")  -> r"\\frac{1}{2}"
    final_answer("6 * 7 = 42, so the answer is 42.")          -> "42"
    final_answer("I count 3 cats and 4 dogs: 7 in all")       -> "7"

The order is the one math graders use (Hendrycks et al.'s MATH, TRL's and verl's math rewards): the last
`\\boxed{...}` (braces nested to any depth; `\\fbox` too), else what follows the last "the answer is" /
"final answer:", else the last number. Pure string functions, no sympy: `math_answer` hands the text they
find to math-verify in a worker process (`rewards.verifiable`).
"""

from __future__ import annotations

import re

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is 42", "Final answer: 42", "**Answer:** 42": what follows, up to the end of its line.
ANSWER_IS = re.compile(r"(?i)\banswer\b\s*(?:\*\*)?\s*(?:is\b|:|=)\s*(?:\*\*)?\s*:?\s*([^\n]*)")
# A number: signed (a minus not glued to a word or digit before it: "5-3" ends in 3, not -3), with
# thousands separators, decimals, or a simple fraction; "1,000" and "3/4" are one number each.
NUMBER = re.compile(
    r"(?<![\w.)\]}])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?<![\w.])-?\.\d+"
)


def last_boxed(text: str) -> str | None:
    """The content of the last closed `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces nested to any
    depth; None when there is none (an unclosed one, e.g. a completion cut at the token limit, does not
    count)."""
    for match in reversed(list(BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{" and text[i - 1] != "\\":
                depth += 1
            elif text[i] == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _trim(answer: str) -> str:
    """An answer's text without the markup around it: bold asterisks, a sentence's final full stop, a
    wrapping pair of $...$ or \\(...\\)."""
    answer = answer.strip().strip("*").strip()
    answer = re.sub(r"[.;,!]+$", "", answer).strip()  # "42." -> "42" ("3.5" keeps its point)
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer[len(left) : -len(right)].strip()
            break
    return answer


def final_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{...}, else what follows the last "answer is" /
    "answer:" on its line, up to a punctuation mark and a space before a word (a full stop and markdown bold
    left off), else the last number
    (its thousands separators kept: "1,000"); None when there is none of these."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    stated = [m for m in ANSWER_IS.finditer(text) if _trim(m.group(1))]
    if stated:
        answer = _trim(stated[-1].group(1).split("</")[0])  # "answer is 4</answer>": the tag ends it
        # "the answer is 42. Let me check", "0.5, as shown" -> "42", "0.5": the answer ends where a
        # punctuation mark and a space lead into a word ("(1, 2)" and "1, 2, 3" stay whole)
        return _trim(re.split(r"[.,;:]\s+(?=[A-Za-z]{2})", answer, maxsplit=1)[0])
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(value) -> str | None:
    """A row's reference answer as text: a number as written, a string's \\boxed{...} content when it has
    one (a MATH solution), what follows the last `####` (a GSM8K solution), else the string stripped;
    None for a missing or empty value (the row gets no opinion)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        return None
    boxed = last_boxed(value)
    if boxed is not None:
        return boxed or None
    if "####" in value:
        value = value.rsplit("####", 1)[1]
    value = _trim(value)
    return value or None
