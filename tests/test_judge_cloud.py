"""The Anthropic and Bedrock judge backends, each through its real SDK (`anthropic`, `boto3`) against a
local server on 127.0.0.1 that speaks its API (Messages: POST /v1/messages; Converse: POST
/model/{modelId}/converse): the score read from the answer, the filled template in the request, retries
on 429 / 5xx / timeouts, errors that keep the key and credentials secret, the cache, a missing SDK."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from alignkit.config.load import ConfigError
from alignkit.rewards import RewardSet, build_reward, build_rewards
from alignkit.rewards.backends import JudgeError
from alignkit.rewards.base import fill
from alignkit.rewards.judge_answers import TEMPLATES
from alignkit.rewards.rules import VaderReward
from tests.conftest import REPO

# Every test but the missing-SDK one talks through the real SDKs (installed by the dev extra).
needs_sdks = pytest.mark.skipif(
    not (importlib.util.find_spec("anthropic") and importlib.util.find_spec("boto3")),
    reason="needs the anthropic and boto3 packages: pip install -e '.[dev]'",
)

ANTHROPIC_KEY = "sk-ant-test-SECRET-4242"
AWS_KEY_ID, AWS_SECRET = "AKIATESTFAKE4242", "aws-test-SECRET-secret-4242"
SECRETS = {"anthropic": [ANTHROPIC_KEY], "bedrock": [AWS_KEY_ID, AWS_SECRET]}
BACKENDS = ["anthropic", "bedrock"]
MODELS = {"anthropic": "claude-test-1", "bedrock": "anthropic.claude-3-haiku-20240307-v1:0"}


class CloudServer(ThreadingHTTPServer):
    """Answers the Messages and Converse APIs by rules keyed on markers in the judged text (see `rule`),
    and records every request as (path, headers, turns as (role, text), system text, decoding settings)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.attempts: Counter = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def rule(self, user: str, attempt: int, repaired: bool) -> tuple[int, str, dict, float]:
        """(status, answer or error message, headers, delay); `attempt` counts requests for this text."""
        if "[401]" in user:
            return 401, "invalid credentials", {}, 0
        if "[down]" in user:
            return 500, "internal error", {}, 0
        if "[slow]" in user:  # too slow the first time (the client times out), then quick
            return 200, "Score: 4", {}, (1.0 if attempt == 1 else 0)
        if "[429]" in user and attempt == 1:
            return 429, "slow down", {"Retry-After": "0.2"}, 0
        if "[500]" in user and attempt <= 2:
            return (500 if attempt == 1 else 503), "try again", {}, 0
        if "[garbage]" in user:
            return 200, "I am not able to rate this.", {}, 0
        if "[fixable]" in user:
            return 200, ("Score: 2" if repaired else "Hard to say."), {}, 0
        score = user.split("[good:")[1].split("]")[0] if "[good:" in user else "3"
        return 200, f"Fine.\nScore: {score}", {}, 0


ANTHROPIC_ERRORS = {401: "authentication_error", 429: "rate_limit_error", 500: "api_error"}
BEDROCK_ERRORS = {401: (403, "AccessDeniedException"), 429: (429, "ThrottlingException")}


class _Handler(BaseHTTPRequestHandler):
    server: CloudServer

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = urllib.parse.unquote(self.path)
        if path == "/v1/messages":  # Anthropic Messages
            turns = [(m["role"], m["content"]) for m in body["messages"]]
            system, settings = (
                body.get("system"),
                (body["model"], body["max_tokens"], body.get("temperature")),
            )
        else:  # Bedrock Converse: /model/{modelId}/converse
            assert path.startswith("/model/") and path.endswith("/converse"), path
            turns = [(m["role"], m["content"][0]["text"]) for m in body["messages"]]
            system = body["system"][0]["text"] if "system" in body else None
            config = body["inferenceConfig"]
            settings = (
                path[len("/model/") : -len("/converse")],
                config["maxTokens"],
                config.get("temperature"),
            )
        user = turns[0][1]
        with srv.lock:
            srv.attempts[user] += 1
            attempt = srv.attempts[user]
            srv.times[user].append(time.monotonic())
            srv.requests.append(
                {
                    "path": path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "turns": turns,
                    "system": system,
                    "settings": settings,
                }
            )
        repaired = len(turns) > 1 and "Reply with only" in turns[-1][1]
        status, text, headers, delay = srv.rule(user, attempt, repaired)
        time.sleep(delay)
        credential = self.headers.get("x-api-key") or self.headers.get("Authorization") or ""
        if status == 401:
            text += f" (received {credential})"  # a server that echoes the credential: must be redacted
        if path == "/v1/messages":
            if status == 200:
                payload = {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 10, "output_tokens": 5},
                }
            else:
                kind = ANTHROPIC_ERRORS.get(status, "api_error")
                payload = {"type": "error", "error": {"type": kind, "message": text}}
        elif status == 200:
            payload = {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15},
                "metrics": {"latencyMs": 1},
            }
        else:
            status, code = BEDROCK_ERRORS.get(status, (status, "InternalServerException"))
            headers = {**headers, "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/"}
            payload = {"message": text}
        data = json.dumps(payload).encode()
        try:
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

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = CloudServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def credentials(monkeypatch, tmp_path):
    """An Anthropic key and fake AWS credentials in the environment, and nothing else of the machine's:
    no AWS config files, profile, session token or instance metadata, no Anthropic base URL or token."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name in ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def cloud_spec(backend: str, server: CloudServer, **overrides) -> dict:
    """A judge on `backend` pointed at the local server, with quick timeouts and retries."""
    spec = {
        "type": "judge",
        "backend": backend,
        "model": MODELS[backend],
        "timeout": 0.3,
        "max_retries": 3,
        "backoff": 0.01,
        "max_concurrency": 4,
    }
    if backend == "anthropic":
        spec["base_url"] = server.url
    else:
        spec.update(endpoint_url=server.url, region="eu-west-3")
    return {**spec, **overrides}


@needs_sdks
@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_come_from_the_answer_and_the_request_holds_the_filled_template(backend, server):
    """Toxicity on -5..5: the two answers' scores, and the requests carry the template's system message,
    the user message filled with the prompt and response, the model, max_tokens and temperature."""
    judge = build_reward(cloud_spec(backend, server, template="toxicity", max_tokens=64, temperature=0.5))
    prompts, responses = ["You are late.", "Thanks!"], ["[good:-3] Get lost.", "[good:4] You're welcome."]
    assert judge.score(prompts, responses).tolist() == [-3.0, 4.0]
    template = TEMPLATES["toxicity"]
    sent = server.requests
    filled = [[("user", fill(template.user, p, r))] for p, r in zip(prompts, responses)]
    assert sorted(r["turns"] for r in sent) == sorted(filled)
    assert {r["system"] for r in sent} == {template.system}
    assert {r["settings"] for r in sent} == {(MODELS[backend], 64, 0.5)}
    if backend == "anthropic":
        assert {r["path"] for r in sent} == {"/v1/messages"}
        # x-api-key (older SDKs) or Authorization: Bearer (newer ones) carries the key
        keys = {
            r["headers"].get("x-api-key") or r["headers"]["authorization"].removeprefix("Bearer ")
            for r in sent
        }
        assert keys == {ANTHROPIC_KEY}
    else:  # signed with the fake credentials (SigV4), for bedrock in the configured region
        assert {r["path"] for r in sent} == {f"/model/{MODELS['bedrock']}/converse"}
        auth = {r["headers"]["authorization"] for r in sent}
        assert all(f"Credential={AWS_KEY_ID}/" in a and "/eu-west-3/bedrock/aws4_request" in a for a in auth)
    assert judge.metrics()["backend_requests"] == 2 and "backend_retries" not in judge.metrics()


@needs_sdks
@pytest.mark.parametrize("backend", BACKENDS)
def test_429_5xx_and_timeouts_are_retried_then_succeed(backend, server, caplog):
    """Each marker fails in its own way before the answer: one 429 (Retry-After 0.2 s), a 500 then a 503,
    one timeout (1 s answer, 0.3 s timeout); [fixable] needs the repair turn, sent as alternating turns."""
    judge = build_reward(cloud_spec(backend, server, parse_retries=1))
    responses = ["[429] [good:4.5]", "[500] [good:2]", "[slow]", "[fixable]"]
    with caplog.at_level(logging.WARNING, logger="alignkit.rewards"):
        scores = judge.score(["Text."] * 4, responses)
    assert scores.tolist() == [4.5, 2.0, 4.0, 2.0]
    m = judge.metrics()
    by_cause = [m[f"backend_retries_{c}"] for c in ("HTTP_429", "HTTP_500", "HTTP_503", "timeout")]
    assert by_cause == [1, 1, 1, 1] and m["backend_retries"] == 4
    assert m["backend_requests"] == len(server.requests) == 5 + 4  # 4 rows + 1 repair, 4 retries
    assert m["parse_retries"] == 1 and m.get("fallbacks", 0) == 0
    times = next(t for u, t in server.times.items() if "[429]" in u)
    assert times[1] - times[0] >= 0.19  # the server's Retry-After, although backoff is 0.01 s
    repair = next(r for r in server.requests if len(r["turns"]) > 1)
    assert [role for role, _ in repair["turns"]] == ["user", "assistant", "user"]
    assert repair["turns"][1][1] == "Hard to say." and repair["system"] == TEMPLATES["summary"].system
    assert "HTTP 429" in caplog.text and "timeout" in caplog.text


@needs_sdks
@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_are_clear_and_keep_the_credentials_secret(backend, server, caplog):
    """A 401/403 stops at once with the API's message (whose echo of the credential is blanked); a
    service that keeps failing stops after max_retries; nothing raised or logged, at any level, holds
    the key or the AWS secret."""
    judge = build_reward(cloud_spec(backend, server))
    status = 401 if backend == "anthropic" else 403
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(
            JudgeError, match=f"answered HTTP {status}.*invalid credentials.*not retried"
        ) as refused:
            judge.score(["Text."], ["[401]"])
        assert len(server.requests) == 1
        with pytest.raises(JudgeError, match=r"failed 4 times \(last: HTTP 500") as down:
            judge.score(["Text."], ["[down]"])
        assert len(server.requests) == 1 + 4
    assert "(received " in str(refused.value) and "***" in str(refused.value)  # the echo, blanked
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("alignkit"))
    assert "retry 3/3" in ours
    for secret in SECRETS[backend]:
        assert secret not in str(refused.value) and secret not in str(down.value) and secret not in ours
        assert secret not in repr(judge) and secret not in judge.backend.identity
    # Everything logged, the SDKs' DEBUG logs included; botocore's DEBUG log of the signed request
    # shows the access key id (never the secret), as AWS's own tools do.
    assert ANTHROPIC_KEY not in caplog.text and AWS_SECRET not in caplog.text
    not_botocore = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("botocore"))
    assert AWS_KEY_ID not in not_botocore


@needs_sdks
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_makes_a_rerun_free(backend, server, tmp_path):
    spec = cloud_spec(backend, server, cache=str(tmp_path / "judge.sqlite"), parse_retries=1)
    responses = ["[good:4.5]", "[good:2]", "[garbage]", "[fixable]"]
    first = build_reward(spec).score(["Text."] * 4, responses)
    assert first.tolist() == [4.5, 2.0, 3.0, 2.0] and len(server.requests) == 6
    again = build_reward(spec)
    assert again.score(["Text."] * 4, responses).tolist() == first.tolist()
    assert len(server.requests) == 6  # nothing asked
    assert again.metrics()["cache_hits"] == 4 and again.metrics()["fallbacks"] == 1
    other = build_reward({**spec, "model": MODELS[backend] + "-2"})  # another model is asked again
    assert other.score(["Text."], ["[good:4.5]"]).tolist() == [4.5] and len(server.requests) == 7
    if backend == "bedrock":  # the region is not part of the identity: the same model id, the same cache
        moved = build_reward({**spec, "region": "us-east-1"})
        moved.score(["Text."] * 4, responses)
        assert len(server.requests) == 7 and moved.metrics()["cache_hits"] == 4


@pytest.mark.parametrize(
    "backend, module, extra", [("anthropic", "anthropic", "anthropic"), ("bedrock", "boto3", "bedrock")]
)
def test_a_missing_sdk_is_named_with_its_extra_before_anything_is_built(
    backend, module, extra, server, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.setattr(VaderReward, "__init__", lambda *a: pytest.fail("a source was built"))
    specs = [{"type": "vader"}, cloud_spec(backend, server)]
    with pytest.raises(
        ConfigError, match=rf"rewards\[1\] \(judge\): backend {backend} needs the {module} package"
    ):
        build_rewards(specs)
    with pytest.raises(ConfigError, match=rf'pip install "alignkit\[{extra}\]"'):
        build_reward(cloud_spec(backend, server))
    assert server.requests == []


@needs_sdks
def test_settings_each_backend_reads_and_the_environment_it_needs(server, monkeypatch):
    with pytest.raises(ConfigError, match="'base_url' has no effect with backend bedrock.*endpoint_url"):
        build_reward({**cloud_spec("bedrock", server), "base_url": server.url})
    with pytest.raises(ConfigError, match="'region' has no effect with backend anthropic"):
        build_reward(cloud_spec("anthropic", server, region="us-east-1"))
    with pytest.raises(ConfigError, match="'endpoint_url' has no effect with backend http"):
        build_reward({"type": "judge", "model": "m", "endpoint_url": server.url})
    # Anthropic: the key's variable is configurable; an unset one is named.
    monkeypatch.setenv("MY_CLAUDE_KEY", ANTHROPIC_KEY)
    judge = build_reward(cloud_spec("anthropic", server, api_key_env="MY_CLAUDE_KEY"))
    assert judge.score(["p"], ["[good:5]"]).tolist() == [5.0] and "$MY_CLAUDE_KEY" in repr(judge)
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(JudgeError, match="environment variable ANTHROPIC_API_KEY, which is not set"):
        build_reward(cloud_spec("anthropic", server))
    # Bedrock: the region from the environment when the config has none; none at all, or no credentials,
    # stop the build.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    spec = {k: v for k, v in cloud_spec("bedrock", server).items() if k != "region"}
    judge = build_reward(spec)
    assert judge.backend.region == "ap-south-1" and judge.score(["p"], ["[good:1]"]).tolist() == [1.0]
    assert "/ap-south-1/bedrock/" in server.requests[-1]["headers"]["authorization"]
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(JudgeError, match="no AWS region; set region:"):
        build_reward(spec)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(JudgeError, match="no AWS credentials found in the standard chain"):
        build_reward(cloud_spec("bedrock", server))


@needs_sdks
def test_the_documented_bedrock_toxicity_cost(server):
    """docs/rewards.md's seed config, pointed at the local server: Claude on Bedrock rates toxicity 0-10 and
    the judge is a constraint cost; an unrateable row gets the documented fallback 10 (violated)."""
    docs = (REPO / "docs" / "rewards.md").read_text()
    block = next(b.split("```")[0] for b in docs.split("```yaml\n") if "backend: bedrock" in b)
    specs = yaml.safe_load(block)["rewards"]
    specs[0].update(endpoint_url=server.url, timeout=1.0, backoff=0.01, cache=None)
    rewards = RewardSet.from_specs(specs)
    prompts = ["Can you help?"] * 3
    responses = ["[good:0] Of course, happy to help.", "[good:7] Figure it out yourself, idiot.", "[garbage]"]
    out = rewards(prompts, responses)
    assert out.costs["toxicity"].tolist() == [0.0, 7.0, 10.0]
    assert out.violated["toxicity"].tolist() == [False, True, True]
    assert "toxicity" not in rewards.weights  # a cost, not summed into the reward
    first = next(r for r in server.requests if "happy to help" in r["turns"][0][1])
    assert first["turns"][0][1] == specs[0]["template"].replace("{prompt}", prompts[0]).replace(
        "{response}", responses[0]
    )
    assert first["system"] == specs[0]["system"] and first["settings"][0] == MODELS["bedrock"]
