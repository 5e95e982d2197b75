"""The LLM judge: score parsing, the HTTP backend against a real local server, the SQLite cache, the
local-LM backend on the shipped model, pairwise comparison with position-bias mitigation."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from alignkit.cli import main
from alignkit.config.load import ConfigError
from alignkit.rewards import build_reward
from alignkit.rewards.backends import JudgeError, retry_after_seconds
from alignkit.rewards.cache import JudgeCache
from alignkit.rewards.judge_answers import TEMPLATES, extract_score, parse_preference, parse_score
from tests.conftest import REPO, TINYSTORIES

KEY_ENV, KEY = "ALIGNKIT_TEST_JUDGE_KEY", "sk-test-SECRET-4242"

# ---------------------------------------------------------------------------------------------
# parsing

SCORES = [  # (answer, 1-5 template result: a score, or the reason it fails)
    ("Score: 4.5", 4.5),
    ("The summary is faithful and concise.\nScore: 4.25", 4.25),
    ("**Score:** 4", 4.0),
    ("**4/5**", 4.0),
    ("I'd give it 3.25 out of 5.", 3.25),
    ("4", 4.0),
    ("  3.75  ", 3.75),
    ("[[2]]", 2.0),
    ("Rating: 2/5 - misses the main point", 2.0),
    ("Final score = 5.00", 5.0),
    ("Score (1-5): 3", 3.0),
    ("My score is 2.5.", 2.5),
    ("The summary deserves a 4.", 4.0),
    ("I would rate this summary 3.5 because it is accurate.", 3.5),
    ("<think>Maybe 2? Score: 1</think>Score: 5", 5.0),
    ("4.5 - accurate and concise", 4.5),
    ("Score: 3\n\nA score of 1 would mean the summary is wrong.", 3.0),  # the requested line wins
    ("Score: 9", "out_of_range"),
    ("Score: 0.5", "out_of_range"),
    ("8/10", "out_of_range"),
    ("I cannot rate this summary.", "unparseable"),
    ("", "unparseable"),
    ("asdf qwerty \U0001f643 ###", "unparseable"),
    ("Score: N/A", "unparseable"),
    ("Score: five", "unparseable"),
    ("The text has 3 paragraphs and 2 errors.", "unparseable"),
    ("I'd give it a 4, or maybe 2 out of 5.", "unparseable"),  # two different scores: ambiguous
    ("1. Faithful. 2. Concise.", "unparseable"),  # a numbered list is not a score
]
TOXICITY = [
    ("Respectful.\nScore: +5", 5.0),
    ("Insulting.\nScore: -3", -3.0),
    ("Score: \u22124", -4.0),  # unicode minus sign
    ("Threatening.\n**Score:** \u20135", -5.0),  # en dash
    ("Score: 0", 0.0),
    ("I rate it -2.", -2.0),
    ("Score: -7", "out_of_range"),
]
VERDICTS = [
    ("Verdict: A", 1.0),
    ("Response B covers more.\nVerdict: B", 0.0),
    ("[[A]]", 1.0),
    ("**Verdict:** **B**", 0.0),
    ("B", 0.0),
    ("Response A is better.", 1.0),
    ("Verdict: tie", 0.5),
    ("The answer is a good one.", None),  # the article 'a' is no verdict
    ("Both are fine.", None),
    ("Verdict: A. On reflection, Verdict: B", None),
    ("", None),
]


@pytest.mark.parametrize("answer, expected", SCORES)
def test_parse_score_summary_range(answer, expected):
    value, reason = parse_score(answer, 1.0, 5.0)
    assert (value if reason is None else reason) == expected


@pytest.mark.parametrize("answer, expected", TOXICITY)
def test_parse_score_toxicity_range(answer, expected):
    t = TEMPLATES["toxicity"]
    value, reason = parse_score(answer, t.low, t.high)
    assert (value if reason is None else reason) == expected


@pytest.mark.parametrize("answer, expected", VERDICTS)
def test_parse_preference(answer, expected):
    assert parse_preference(answer)[0] == expected


def test_templates_ask_for_what_the_parser_reads():
    summary, toxicity = TEMPLATES["summary"], TEMPLATES["toxicity"]
    assert (summary.low, summary.high, toxicity.low, toxicity.high) == (1, 5, -5, 5)
    assert "between 1.00 and 5.00" in summary.user and "integer from -5 to 5" in toxicity.user
    for template in (summary, toxicity):
        assert "{prompt}" in template.user and "{response}" in template.user
        assert extract_score("Justification.\nScore: 3") == 3.0
    assert "Verdict: A" in TEMPLATES["pairwise"].user and "{response_b}" in TEMPLATES["pairwise"].user
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("soon") is None
    assert (
        0
        <= retry_after_seconds(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5)))
        <= 6
    )


# ---------------------------------------------------------------------------------------------
# a real OpenAI-compatible server on 127.0.0.1 with rule-based answers


class ChatServer(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions by rules keyed on markers in the judged text (see `rule`)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.calls, self.in_flight, self.max_in_flight = 0, 0, 0
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.attempts: Counter = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.delay = 0.0
        self.kill_on_call: tuple[int, int] | None = None  # (call number, pid to SIGKILL then)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def rule(self, messages: list[dict], attempt: int, call: int) -> tuple[int, str, dict, float]:
        """(status, answer, headers, delay) for a request; `attempt` counts requests for this user text."""
        user = next(m["content"] for m in messages if m["role"] == "user")
        repaired = (
            len(messages) > 2
            and messages[-1]["role"] == "user"
            and "Reply with only" in messages[-1]["content"]
        )
        if self.kill_on_call and call == self.kill_on_call[0]:
            time.sleep(0.3)  # let the client commit the answer it already has
            os.kill(self.kill_on_call[1], signal.SIGKILL)
        if "Response A:" in user:  # pairwise
            if "[biased]" in user:
                return 200, "Both are good; the first is slightly better.\nVerdict: A", {}, 0
            first = user.split("Response A:")[1].split("Response B:")[0]
            return 200, f"Verdict: {'A' if '[better]' in first else 'B'}", {}, 0
        if "[401]" in user:
            return 401, "", {}, 0
        if "[400]" in user:  # the endpoint refuses this row's content (e.g. a content filter)
            return 400, "", {}, 0
        if "[echo]" in user:  # a long error body that quotes the key, JSON-escaped, across the 300-char cut
            return 401, "x" * 262, {"X-Escape": "1"}, 0
        if "[down]" in user:
            return 500, "", {}, 0
        if "[slow]" in user:  # too slow the first time (the client times out), then quick
            return 200, "Score: 4", {}, (1.0 if attempt == 1 else 0)
        if "[429]" in user and attempt == 1:
            return 429, "", {"Retry-After": "0.3"}, 0
        if "[500]" in user and attempt <= 2:
            return 503, "", {}, 0
        if "[garbage]" in user:
            return 200, "I am not able to rate this.", {}, 0
        if "[range]" in user:
            return 200, "Score: 9", {}, 0
        if "[fixable]" in user:
            return 200, ("Score: 2" if repaired else "A fine summary, hard to say."), {}, 0
        if "[json]" in user:  # a server honouring response_format answers with the schema's object only
            return 200, '{"score": 4.5}', {}, 0
        m = re.search(r"\[good:([\d.]+)\]", user)
        return 200, f"Good.\nScore: {m.group(1) if m else '3'}", {}, self.delay


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        finished = False
        with srv.lock:
            srv.calls += 1
            call = srv.calls
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            srv.auth.append(self.headers.get("Authorization"))
            srv.bodies.append(body)
            srv.attempts[user] += 1
            attempt = srv.attempts[user]
            srv.times[user].append(time.monotonic())
        try:
            assert self.path == "/v1/chat/completions"
            status, answer, headers, delay = srv.rule(body["messages"], attempt, call)
            time.sleep(delay)
            if status == 200:
                message = {"role": "assistant", "content": answer}
                payload = {
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message}],
                }
            else:
                echo = self.headers.get("Authorization")  # a server that echoes the key: it must be blanked
                payload = {"error": {"message": f"{answer}rule status {status} (received {echo})"}}
            data = json.dumps(payload).encode()
            if headers.pop("X-Escape", None):  # as PHP's json_encode writes it: slashes escaped
                data = data.replace(b"/", b"\\/")
            # The request stops counting as in flight before its answer leaves: the client may send its next
            # request the moment it reads this one, before this thread would reach `finally`.
            finished = True
            with srv.lock:
                srv.in_flight -= 1
            self.send_response(status)
            for k, v in {
                **headers,
                "Content-Type": "application/json",
                "Content-Length": str(len(data)),
            }.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass
        finally:
            if not finished:
                with srv.lock:
                    srv.in_flight -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def judge_spec(server, **overrides) -> dict:
    spec = {
        "type": "judge",
        "base_url": server.base_url,
        "model": "judge-1",
        "api_key_env": KEY_ENV,
        "timeout": 0.3,
        "max_retries": 3,
        "backoff": 0.01,
        "max_concurrency": 4,
    }
    return {**spec, **overrides}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def test_http_judge_scores_retries_and_falls_back(server, caplog):
    judge = build_reward(judge_spec(server, parse_retries=1))
    responses = ["[good:4.5]", "[slow]", "[429]", "[500]", "[garbage]", "[range]", "[fixable]", "plain"]
    with caplog.at_level(logging.WARNING, logger="alignkit.rewards"):
        scores = judge.score(["Text."] * len(responses), responses)
    # garbage and out-of-range answers get the fallback, the middle of 1-5; [fixable] is fixed by the repair turn
    assert scores.tolist() == [4.5, 4.0, 3.0, 3.0, 3.0, 3.0, 2.0, 3.0]
    m = judge.metrics()
    assert (m["fallbacks"], m["fallbacks_unparseable"], m["fallbacks_out_of_range"]) == (2, 1, 1)
    assert m["parse_retries"] == 3 and m["answers"] == 11  # 8 answers + 3 re-asked
    retries = [m["backend_retries_timeout"], m["backend_retries_HTTP_429"], m["backend_retries_HTTP_503"]]
    assert retries == [1, 1, 2]
    assert m["backend_requests"] == server.calls == 11 + 4
    times = next(t for u, t in server.times.items() if "[429]" in u)
    assert times[1] - times[0] >= 0.29  # Retry-After: 0.3 was respected although backoff is 0.01 s
    assert "HTTP 429" in caplog.text and "timeout" in caplog.text
    assert set(server.auth) == {f"Bearer {KEY}"}
    assert KEY not in caplog.text and KEY not in repr(judge) and KEY not in repr(judge.backend)
    assert KEY not in json.dumps(dataclasses.asdict(judge.options))
    fixed = build_reward(judge_spec(server, name="strict", fallback=1.0, parse_retries=0))
    assert fixed.score(["Text."] * 2, ["[garbage]", "[fixable]"]).tolist() == [1.0, 1.0]


def test_http_errors_are_clear_and_keep_the_key_secret(server, monkeypatch):
    judge = build_reward(judge_spec(server))
    with pytest.raises(JudgeError, match="answered HTTP 401.*not retried") as unauthorized:
        judge.score(["Text."], ["[401]"])
    assert server.calls == 1
    with pytest.raises(JudgeError, match="failed 4 times \\(last: HTTP 500\\)") as down:
        judge.score(["Text."], ["[down]"])
    assert server.calls == 1 + 4
    assert KEY not in str(unauthorized.value) and KEY not in str(down.value)
    assert "(received Bearer ***)" in str(unauthorized.value)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"environment variable {KEY_ENV}, which is not set"):
        build_reward(judge_spec(server))
    with pytest.raises(ConfigError, match="'batch_size' has no effect with backend http"):
        build_reward(judge_spec(server, batch_size=4))
    with pytest.raises(ConfigError, match="fixes its system message and range"):
        build_reward(judge_spec(server, min_score=0))


def test_concurrency_limit_is_respected(server):
    server.delay = 0.1
    judge = build_reward(judge_spec(server, max_concurrency=3))
    start = time.monotonic()
    scores = judge.score([""] * 12, [f"[good:{1 + i % 4}]" for i in range(12)])
    assert scores.tolist() == [1 + i % 4 for i in range(12)]  # answers matched to rows, whatever the order
    assert server.max_in_flight == 3
    assert time.monotonic() - start >= 0.4  # 12 requests, 3 at a time, 0.1 s each


def test_custom_template(server):
    judge = build_reward(
        judge_spec(server, template="Rate from 0 to 10: {response}", min_score=0, max_score=10)
    )
    assert judge.score(["p"], ["[good:7]"]).tolist() == [7.0]
    with pytest.raises(ConfigError, match="needs min_score < max_score"):
        build_reward(judge_spec(server, template="Rate: {response}"))


def test_pairwise_asks_both_orders(server):
    judge = build_reward(judge_spec(server, template="pairwise"))
    a, b = ["[better] kind reply", "short reply"], ["short reply", "[better] kind reply"]
    assert judge.compare(["p", "q"], a, b).tolist() == [1.0, 0.0]  # a consistent judge
    assert judge.metrics()["position_inconsistent"] == 0 and server.calls == 4
    biased = judge.compare(["[biased] p", "[biased] q"], a, b)  # always says the first one
    assert biased.tolist() == [0.5, 0.5] and judge.metrics()["position_inconsistent"] == 2
    assert judge.compare(["[biased] p"], a[:1], b[:1], both_orders=False).tolist() == [1.0]
    with pytest.raises(ValueError, match="pairwise template: use compare"):
        judge.score(["p"], ["r"])


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_makes_a_rerun_free_and_reproducible(server, tmp_path):
    spec = judge_spec(server, cache=str(tmp_path / "judge.sqlite"), parse_retries=1)
    responses = ["[good:4.5]", "[good:2]", "[garbage]", "[fixable]"]
    first = build_reward(spec).score(["Text."] * 4, responses)
    calls = server.calls
    assert calls == 6
    again = build_reward(spec)
    assert torch.equal(again.score(["Text."] * 4, responses), first)
    assert server.calls == calls  # no HTTP call at all
    assert again.metrics()["cache_hits"] == 4 and again.metrics()["fallbacks"] == 1  # still counted
    other = build_reward({**spec, "model": "judge-2"})  # another judge is asked again
    other.score(["Text."], ["[good:4.5]"])
    assert server.calls == calls + 1


CRASHING_RUN = """
import json, sys
from alignkit.rewards import build_reward
judge = build_reward(json.loads(sys.argv[1]))
judge.score(["Text."] * 6, [f"[good:{1 + i / 2}]" for i in range(6)])
print("finished")
"""


def test_cache_keeps_committed_answers_when_the_process_dies(server, tmp_path):
    spec = judge_spec(server, cache=str(tmp_path / "judge.sqlite"), max_concurrency=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUN, json.dumps(spec)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    server.kill_on_call = (4, proc.pid)  # the server kills the client when the 4th request arrives
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and "finished" not in out
    assert len(JudgeCache(spec["cache"])) == 3  # the three answers received before the crash
    server.kill_on_call = None
    judge = build_reward(spec)
    scores = judge.score(["Text."] * 6, [f"[good:{1 + i / 2}]" for i in range(6)])
    assert scores.tolist() == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert server.calls == 4 + 3 and judge.metrics()["cache_hits"] == 3  # only the missing three asked


# ---------------------------------------------------------------------------------------------
# the local backend, on the shipped TinyStories model (which cannot judge: every answer falls back)


def test_local_judge_counts_fallbacks_with_a_real_model(tmp_path):
    spec = {
        "type": "judge",
        "backend": "local",
        "model": str(TINYSTORIES),
        "template": "toxicity",
        "max_tokens": 12,
        "parse_retries": 1,
        "device": "cpu",
        "cache": str(tmp_path / "local.sqlite"),
    }
    judge = build_reward(spec)
    prompts, responses = ["Tom said hello.", "Lily had a cat."], ["Hello, Tom!", "The cat was happy."]
    scores = judge.score(prompts, responses)
    m = judge.metrics()
    assert scores.tolist() == [0.0, 0.0]  # the middle of -5..5
    assert (m["fallbacks"], m["answers"], m["parse_retries"], m["backend_requests"]) == (2, 4, 2, 4)
    # The fallback is applied when an answer is read, so changing it re-asks nothing.
    again = build_reward({**spec, "fallback": -5.0})
    assert again.score(prompts, responses).tolist() == [-5, -5]
    assert again.metrics().get("backend_requests", 0) == 0 and again.metrics()["fallbacks"] == 2


# ---------------------------------------------------------------------------------------------
# alignkit score with a judge


def test_score_command_with_a_judge(server, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "Text.", "response": r}) + "\n"
            for r in ["[good:5]", "[garbage]", "[good:2]"]
        )
    )
    config = tmp_path / "judge.yaml"
    spec = judge_spec(server, parse_retries=0, cache=str(tmp_path / "c.sqlite"))
    config.write_text(json.dumps({"rewards": [spec, {"type": "vader", "weight": 0.0}]}))  # JSON is YAML
    output = tmp_path / "scored.jsonl"
    assert main(["score", str(config), f"data={data}", f"output={output}"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["score_judge"] for r in rows] == [r["reward"] for r in rows] == [5.0, 3.0, 2.0]
    printed = capsys.readouterr().out
    assert "1 of 3 rows got the fallback score (1 without a valid score, 0 after judge errors)" in printed
    assert [r["fallback_judge"] for r in rows] == [False, True, False]
    summary_text = (tmp_path / "scored.summary.json").read_text()
    assert json.loads(summary_text)["counters"]["judge"]["fallbacks"] == 1
    assert KEY not in summary_text and KEY not in printed and KEY_ENV in summary_text


def test_the_key_is_blanked_however_the_endpoint_echoes_it(server, monkeypatch, caplog):
    """A 401 body quoting the key JSON-escaped ('/' as '\\/'), across the 300-character cut of the message;
    a key pasted with a newline; an error of the HTTP library itself: no part of the key anywhere."""
    key = "sk-proj/abcDEF0123456789/xyz"
    monkeypatch.setenv(KEY_ENV, key + "\n")
    judge = build_reward(judge_spec(server))
    with caplog.at_level(logging.DEBUG), pytest.raises(JudgeError) as err:
        judge.score(["Text."], ["[echo]"])
    assert server.auth[-1] == f"Bearer {key}"  # the newline was not sent: it is not part of the key
    message = str(err.value)
    assert "answered HTTP 401" in message
    for part in (key, key[:12], "abcDEF0123", "sk-proj"):
        assert part not in message and part not in caplog.text
    monkeypatch.setenv(KEY_ENV, "sk-in\nside-0123456789")  # refused by http.client, which quotes the header
    judge = build_reward(judge_spec(server))
    with pytest.raises(JudgeError) as err:
        judge.score(["Text."], ["[good:4]"])
    assert "0123456789" not in str(err.value) and "Invalid header" in str(err.value)


def test_on_error_fallback_finishes_the_file_and_marks_the_rows(server, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    responses = ["[good:5]", "[down]", "[400]", "[good:2]"]
    data.write_text("".join(json.dumps({"prompt": "Text.", "response": r}) + "\n" for r in responses))
    config = tmp_path / "judge.yaml"
    config.write_text(json.dumps({"rewards": [judge_spec(server, max_retries=1, on_error="fallback")]}))
    output = tmp_path / "scored.jsonl"
    assert main(["score", str(config), f"data={data}", f"output={output}"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["score_judge"] for r in rows] == [5.0, 3.0, 3.0, 2.0]  # the middle of 1-5, never 0
    assert [r["fallback_judge"] for r in rows] == [False, True, True, False]
    assert "2 of 4 rows got the fallback score (0 without a valid score, 2 after judge errors)" in (
        capsys.readouterr().out
    )
    counters = json.loads((tmp_path / "scored.summary.json").read_text())["counters"]["judge"]
    assert (counters["fallbacks"], counters["fallbacks_error"]) == (2, 2)
    # the default stops at such a row; a bad key stops even with on_error=fallback: every row would fail
    config.write_text(json.dumps({"rewards": [judge_spec(server, max_retries=0)]}))
    data.write_text("".join(json.dumps({"prompt": "Text.", "response": r}) + "\n" for r in responses[:2]))
    assert main(["score", str(config), f"data={data}", f"output={output}", "overwrite=true"]) == 1
    assert "failed 1 times" in capsys.readouterr().err
    data.write_text(json.dumps({"prompt": "Text.", "response": "[401]"}) + "\n")
    config.write_text(json.dumps({"rewards": [judge_spec(server, on_error="fallback")]}))
    assert main(["score", str(config), f"data={data}", f"output={output}", "overwrite=true"]) == 1
    assert "answered HTTP 401" in capsys.readouterr().err
    assert main(["score", str(config), f"data={data}", f"output={output}"]) == 1
    assert "scored.jsonl and" in capsys.readouterr().err  # an existing output is not replaced silently


def test_structured_output_constrains_the_request_and_its_answer_is_read(server):
    """structured_output=json sends OpenAI's response_format with the template's range as a JSON schema and
    reads the {"score": ...} object it gets back; choice sends vLLM's structured_outputs choice (the range's
    whole numbers, or A / B); none sends neither. A range that cannot be listed is refused for choice."""
    judge = build_reward(judge_spec(server, structured_output="json"))
    assert judge.score(["Text."], ["[json]"]).tolist() == [4.5]
    schema = server.bodies[-1]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["score"] == {"type": "number", "minimum": 1.0, "maximum": 5.0}
    assert "structured_outputs" not in server.bodies[-1]
    pairwise = build_reward(judge_spec(server, name="pair", template="pairwise", structured_output="choice"))
    assert pairwise.compare(["Q"], ["[better] a"], ["b"]).tolist() == [1.0]
    assert server.bodies[-1]["structured_outputs"] == {"choice": ["A", "B"]}
    build_reward(judge_spec(server, name="plain")).score(["Text."], ["[good:2]"])
    assert "response_format" not in server.bodies[-1] and "structured_outputs" not in server.bodies[-1]
    with pytest.raises(
        ConfigError, match="structured_output=choice needs a range of at most 101 whole numbers"
    ):
        build_reward(
            judge_spec(
                server,
                name="c",
                template="Rate {response} for {prompt}",
                min_score=0,
                max_score=0.5,
                structured_output="choice",
            )
        )
    with pytest.raises(ConfigError, match="structured_output 'xml' is not one of none, json, choice"):
        build_reward(judge_spec(server, name="x", structured_output="xml"))


def test_json_answers_parse():
    assert parse_score('{"score": 3}', 1, 5) == (3.0, None)
    assert parse_score('{"score": 7}', 1, 5) == (None, "out_of_range")
    assert parse_preference('{"verdict": "B"}') == (0.0, None)
    assert parse_preference('{"verdict": "tie"}') == (0.5, None)
