"""`type: remote`: OpenRLHF's remote reward wire format against a real HTTP server on localhost, started by
the test in a thread: the request's fields and batching, retries after a 500 and a timeout, a wrong-length
answer, and an API key that reaches the server but no log, error or metric."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.config.load import ConfigError
from alignkit.rewards import RewardSet, ScoreContext, build_reward
from alignkit.rewards.backends import JudgeError

KEY_ENV, KEY = "ALIGNKIT_TEST_REMOTE_KEY", "sk-remote-SECRET-7171"
FAST = {"backoff": 0.0, "max_backoff": 0.0}  # retries without waiting


class Server:
    """A reward server on localhost whose answer to the n-th request (0 = first) is `answer(n, body,
    headers) -> (status, JSON-able body, seconds to wait first)`; it records every request."""

    def __init__(self, answer):
        self.answer, self.requests, self.lock = answer, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append((self.path, body, dict(self.headers)))
                status, out, delay = server.answer(n, body, self.headers)
                time.sleep(delay)
                data = json.dumps(out).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/get_reward"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(answer):
        servers.append(Server(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def lengths(n, body, headers):
    """rewards = the length of each query (OpenRLHF's serve_rm answers {"rewards": [...]})."""
    return 200, {"rewards": [float(len(q)) for q in body["query"]]}, 0.0


def test_requests_carry_query_prompts_and_labels_in_batches(serve):
    """5 responses, batch_size 2: three requests (2 + 2 + 1), each {"query": prompt + response, "prompts",
    "labels": the label column}; the scores come back in order (the length of 'Q1: ' + 'a' is 5, ...)."""
    server = serve(lengths)
    source = build_reward(
        {"type": "remote", "url": server.url, "label_column": "answer", "batch_size": 2, "max_concurrency": 2}
    )
    assert source.columns == ("answer",)
    prompts = [f"Q{i}: " for i in range(1, 6)]
    responses = ["a", "bb", "ccc", "dddd", "eeeee"]
    out = source.score(prompts, responses, context=ScoreContext({"answer": ["1", "2", "3", "4", "5"]}))
    assert out.tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]
    bodies = sorted((body for _, body, _ in server.requests), key=lambda b: b["prompts"][0])
    assert [b["query"] for b in bodies] == [["Q1: a", "Q2: bb"], ["Q3: ccc", "Q4: dddd"], ["Q5: eeeee"]]
    assert [b["prompts"] for b in bodies] == [["Q1: ", "Q2: "], ["Q3: ", "Q4: "], ["Q5: "]]
    assert [b["labels"] for b in bodies] == [["1", "2"], ["3", "4"], ["5"]]
    assert {path for path, _, _ in server.requests} == {"/get_reward"}
    assert "Authorization" not in server.requests[0][2]  # no api_key_env: no key sent
    assert source.metrics() == {"scored": 5.0, "no_opinion": 0.0, "backend_requests": 3.0}


def test_scores_key_null_as_no_opinion_conversation_prompts_and_a_query_template(serve):
    """An answer with only "scores" is read; a null is NaN (no opinion), and through a RewardSet the row
    keeps the other source's score. Without label_column the labels are "" (as OpenRLHF sends); a
    conversation's prompt is sent as its content; `query` places prompt and response."""
    server = serve(lambda n, body, h: (200, {"scores": [None, 0.25]}, 0.0))
    spec = {"type": "remote", "url": server.url, "query": "<user>{prompt}<assistant>{response}"}
    rewards = RewardSet.from_specs([spec, {"type": "length", "weight": 0.5}])
    prompts = [[{"role": "user", "content": "Hi"}], "Yo"]
    out = rewards(prompts, ["one two", "x"])
    assert out.scores["remote"][0].isnan() and out.scores["remote"][1] == 0.25
    assert out.total.tolist() == [1.0, 0.25 + 0.5]  # 0.5 * 2 words; 0.25 + 0.5 * 1 word
    body = server.requests[0][1]
    assert body == {
        "query": ["<user>Hi<assistant>one two", "<user>Yo<assistant>x"],
        "prompts": ["Hi", "Yo"],
        "labels": ["", ""],
    }
    assert rewards.sources[0].metrics()["no_opinion"] == 1.0


def test_a_500_is_retried_then_succeeds(serve, caplog):
    server = serve(lambda n, body, h: (500, {"error": "busy"}, 0.0) if n == 0 else lengths(n, body, h))
    source = build_reward({"type": "remote", "url": server.url, **FAST})
    with caplog.at_level(logging.WARNING, logger="alignkit.rewards"):
        assert source.score(["p"], ["abc"]).tolist() == [4.0]
    metrics = source.metrics()
    assert metrics["backend_requests"] == 2 and metrics["backend_retries"] == 1
    assert metrics["backend_retries_HTTP_500"] == 1
    assert "remote reward server" in caplog.text and "HTTP 500" in caplog.text


def test_a_timeout_is_retried_and_a_server_that_keeps_timing_out_is_an_error(serve):
    """The first answer comes after 2 s, past the 0.3 s timeout: retried, the second is in time. A server
    that is always late fails after 1 + max_retries attempts, the error naming the last cause."""
    slow_first = serve(lambda n, body, h: (*lengths(n, body, h)[:2], 2.0 if n == 0 else 0.0))
    source = build_reward({"type": "remote", "url": slow_first.url, "timeout": 0.3, **FAST})
    assert source.score(["p"], ["ab"]).tolist() == [3.0]
    assert source.metrics()["backend_retries_timeout"] == 1
    always_slow = serve(lambda n, body, h: (*lengths(n, body, h)[:2], 2.0))
    source = build_reward(
        {"type": "remote", "url": always_slow.url, "timeout": 0.3, "max_retries": 1, **FAST}
    )
    with pytest.raises(JudgeError, match=r"remote reward server .* failed 2 times \(last: timeout\)"):
        source.score(["p"], ["ab"])


def test_a_wrong_length_or_malformed_answer_is_a_clear_error(serve):
    """Two rewards for three queries is the server's bug: an error at once (one request, not retried) that
    says what came back; a value that is not a number likewise; an answer without rewards or scores is
    retried (a server restarting may answer so) and then names the keys it had."""
    server = serve(lambda n, body, h: (200, {"rewards": [1.0, 2.0]}, 0.0))
    source = build_reward({"type": "remote", "url": server.url, **FAST})
    with pytest.raises(JudgeError, match=r"answered 'rewards' with 2 values for 3 responses.*not retried"):
        source.score(["p"] * 3, ["a", "b", "c"])
    assert len(server.requests) == 1
    text = serve(lambda n, body, h: (200, {"rewards": ["high"]}, 0.0))
    with pytest.raises(JudgeError, match=r'answered \'rewards\' with "high", not a number'):
        build_reward({"type": "remote", "url": text.url}).score(["p"], ["a"])
    other = serve(lambda n, body, h: (200, {"reward": [1.0]}, 0.0))
    source = build_reward({"type": "remote", "url": other.url, "max_retries": 1, **FAST})
    with pytest.raises(JudgeError, match=r"without 'rewards' or 'scores' \(found \['reward'\]\)"):
        source.score(["p"], ["a"])
    assert len(other.requests) == 2


def test_the_api_key_is_sent_but_never_logged_raised_or_counted(serve, monkeypatch, caplog):
    """The key from the environment reaches the server as `Authorization: Bearer <key>`. The server then
    echoes it: in a 503's body (retried and logged) and in a 401's body (an error at once); neither the log,
    the error, the metrics nor the source's repr holds the key."""
    monkeypatch.setenv(KEY_ENV, KEY)

    def answer(n, body, headers):
        if n == 0:
            return 503, {"error": f"overloaded, your header was {headers['Authorization']}"}, 0.0
        if n == 1:
            return lengths(n, body, headers)
        return 401, {"error": f"invalid key {headers['Authorization'][7:]}"}, 0.0

    server = serve(answer)
    source = build_reward({"type": "remote", "url": server.url, "api_key_env": KEY_ENV, **FAST})
    with caplog.at_level(logging.DEBUG):
        assert source.score(["p"], ["a"]).tolist() == [2.0]
        with pytest.raises(JudgeError, match="answered HTTP 401") as refused:
            source.score(["p"], ["a"])
    assert server.requests[0][2]["Authorization"] == f"Bearer {KEY}"
    assert "***" in str(refused.value)
    for text in (caplog.text, str(refused.value), json.dumps(source.metrics()), repr(source)):
        assert KEY not in text and KEY[3:] not in text
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"environment variable {KEY_ENV}, which is not set"):
        build_reward({"type": "remote", "url": server.url, "api_key_env": KEY_ENV})


def test_remote_options_are_checked_and_the_label_column_is_required():
    with pytest.raises(ConfigError, match="'url' '' is not an http"):
        build_reward({"type": "remote"})
    with pytest.raises(ConfigError, match="has no {response}"):
        build_reward({"type": "remote", "url": "http://localhost:1/x", "query": "{prompt}"})
    with pytest.raises(ConfigError, match="batch_size and max_concurrency must be >= 1"):
        build_reward({"type": "remote", "url": "http://localhost:1/x", "batch_size": 0})
    rewards = RewardSet.from_specs(
        [{"type": "remote", "url": "http://localhost:1/x", "label_column": "answer"}]
    )
    with pytest.raises(ValueError, match="reads the column.*answer.*columns there: none"):
        rewards(["p"], ["a"], context=ScoreContext())
