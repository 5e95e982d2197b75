"""The process in which `math_answer` checks answers with math-verify (`rewards.verifiable.MathChecker`
starts it and talks to it; this file is run as a script and imports nothing of alignkit).

math-verify stops a slow parse or comparison with SIGALRM, which works only on a process's main thread,
and a GRPO step may score in a thread. So the checks run here, on this process's own main thread, with
math-verify's alarm off (`parsing_timeout=None`, `timeout_seconds=None`) and one alarm of our own around
each item: an item past `timeout` seconds answers "timeout" (a sympy computation such as 9^{9^{9^9}} can
run for hours). Should the alarm not get through (a long computation inside C), the parent kills this
process and starts another.

Protocol, one JSON object per line: this process first writes {"ready": true}; then for each
{"answer": text, "reference": text} read from stdin it writes {"verdict": v}, v one of correct, wrong,
unparseable (math-verify reads nothing in the answer), bad_reference (nor in the reference), timeout,
error. It ends when stdin closes.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys


class ItemTimeout(BaseException):
    """Raised by our alarm in the middle of an item; a BaseException, since math-verify catches every
    Exception (and would report a timed-out parse as an empty one)."""


def _alarm(signum, frame):
    raise ItemTimeout()


@functools.lru_cache(maxsize=4096)
def parse_math(text: str) -> tuple:
    """math-verify's reading of `text` as one LaTeX expression (empty when it finds none); a GRPO group's
    completions share one reference, so the references' readings are cached."""
    from math_verify import parse

    return tuple(parse(f"${text}$", parsing_timeout=None))


def check(answer: str, reference: str) -> str:
    """The verdict on one answer against its reference (see the module docstring)."""
    from math_verify import verify

    gold = parse_math(reference)
    if not gold:
        return "bad_reference"
    found = parse_math(answer)
    if not found:
        return "unparseable"
    return "correct" if verify(list(gold), list(found), timeout_seconds=None) else "wrong"


def serve(timeout: float, stdin, stdout) -> None:
    """Answers the items read from `stdin` on `stdout` until stdin closes, each within `timeout` seconds."""
    import math_verify  # noqa: F401  (a missing package fails here, before "ready")

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: ours is on
    signal.signal(signal.SIGALRM, _alarm)
    print(json.dumps({"ready": True}), file=stdout, flush=True)
    for line in stdin:
        item = json.loads(line)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                verdict = check(item["answer"], item["reference"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except ItemTimeout:  # (also when it fired in the finally, just before the alarm was cleared)
            verdict = "timeout"
        except Exception:
            verdict = "error"
        print(json.dumps({"verdict": verdict}), file=stdout, flush=True)


if __name__ == "__main__":
    protocol, sys.stdout = sys.stdout, sys.stderr  # whatever a library prints cannot garble the replies
    serve(float(sys.argv[-1]), sys.stdin, protocol)
