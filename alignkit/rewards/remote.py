"""`type: remote`: a reward model or verifier served over HTTP, in OpenRLHF's wire format, so that a server
written for OpenRLHF's `--remote_rm_url` (its `openrlhf.cli.serve_rm`, or a verifier of your own) works
unchanged:

    POST <url>  {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...]}
    answer      {"rewards": [number, ...]}   (or {"scores": [...]}; a null is no opinion: NaN)

`query` is each response with its prompt before it (`query:` template, "{prompt}{response}" by default;
OpenRLHF sends the policy's decoded prompt and completion, chat markup included: a server that needs the
markup gets it from a template such as "<|user|>{prompt}<|assistant|>{response}"). `prompts` are the prompts'
text (a conversation's content, `rewards.base.prompt_text`); `labels` the rows' `label_column` (e.g. a
math problem's answer), or "" for each row without one, as OpenRLHF sends without `--label_key`.

The responses go `batch_size` per request, `max_concurrency` requests at a time, each retried after a
timeout, a dropped connection or HTTP 408/409/429/5xx, with back-off, as the LLM judge's requests are
(`backends.RemoteChatBackend`); the API key, when one is needed, is read from the environment variable
`api_key_env`, sent as `Authorization: Bearer ...`, and blanked from every log line, error and metric.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from alignkit.config.load import ConfigError
from alignkit.rewards.backends import JudgeError, RemoteChatBackend, Retry, post_json, read_api_key
from alignkit.rewards.base import (
    Prompt,
    ScoreContext,
    SourceOptions,
    as_scores,
    check_batch,
    fill,
    prompt_text,
)

SCORE_KEYS = ("rewards", "scores")  # read in this order: OpenRLHF's servers answer with both


@dataclass
class RemoteOptions(SourceOptions):
    """A reward server over HTTP in OpenRLHF's format (POST query, prompts, labels; answer rewards)."""

    url: str = ""
    """The server's full URL, e.g. http://localhost:5000/get_reward (OpenRLHF's serve_rm)."""
    query: str = "{prompt}{response}"
    """What each `query` holds: a template over {prompt} and {response}."""
    label_column: str | None = None
    """The prompt rows' column sent as `labels` (e.g. answer); none: an empty label per row."""
    api_key_env: str | None = None
    """Name of the environment variable holding an API key (never the key itself); none: no key."""
    batch_size: int = 64
    """Responses per request."""
    timeout: float = 60.0
    """Seconds to wait for one request's answer before retrying."""
    max_retries: int = 5
    """Retries after a timeout, dropped connection, HTTP 408/409/429 or 5xx, with exponential back-off."""
    backoff: float = 1.0
    """First retry waits about this many seconds; each further one twice as long."""
    max_backoff: float = 60.0
    """Longest wait between retries (also caps the server's Retry-After)."""
    max_concurrency: int = 4
    """Requests in flight at once."""


class RemoteRewardBackend(RemoteChatBackend):
    """One request is one batch: `send(payload)` POSTs it and returns its scores (floats, NaN for null),
    with `RemoteChatBackend`'s retries, concurrency and redaction."""

    service = "remote reward server"
    gave_up = "check that the server is up and answers the url (see the server's own log)"

    def __init__(self, url: str, api_key_env: str | None, **retries):
        super().__init__(**retries)
        self.url = self.target = url
        self._api_key = read_api_key(api_key_env, "or set api_key_env: null for a server without a key")
        self._secrets = (self._api_key,) if self._api_key else ()

    def __repr__(self) -> str:
        return f"RemoteRewardBackend(url={self.url!r})"

    def send(self, payload: dict) -> list[float]:
        """One attempt: the batch's scores (see the module docstring for what it reads)."""
        answer = post_json(
            self.url,
            json.dumps(payload, ensure_ascii=False).encode(),
            self._api_key,
            timeout=self.timeout,
            redact=self.redact,
            service=self.service,
            hint="check url and the API key variable",
        )
        n = len(payload["query"])
        key = next((k for k in SCORE_KEYS if isinstance(answer, dict) and k in answer), None)
        if key is None:
            found = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
            raise Retry(f"an answer without 'rewards' or 'scores' (found {found})")
        scores = answer[key]
        if not isinstance(scores, list) or len(scores) != n:
            size = f"{len(scores)} values" if isinstance(scores, list) else type(scores).__name__
            raise JudgeError(
                f"{self.service} {self.url} answered '{key}' with {size} for {n} responses; it must send "
                "one number per query, in order (not retried: check the server)"
            )
        bad = [
            v for v in scores if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
        ]
        if bad:
            raise JudgeError(
                f"{self.service} {self.url} answered '{key}' with {json.dumps(bad[0])[:80]}, not a number "
                "(null means no opinion); check the server"
            )
        return [math.nan if v is None else float(v) for v in scores]


class RemoteReward:
    """A remote reward server; see the module docstring. `metrics()`: scored, no_opinion (null scores), and
    the backend's requests and retries (by cause)."""

    def __init__(self, options: RemoteOptions):
        self.check(options, f"reward '{options.name}'")
        self.options, self.name, self.weight = options, options.name, options.weight
        self.columns = (options.label_column,) if options.label_column else ()
        self.backend = RemoteRewardBackend(
            options.url,
            options.api_key_env,
            timeout=options.timeout,
            max_retries=options.max_retries,
            backoff=options.backoff,
            max_backoff=options.max_backoff,
            max_concurrency=options.max_concurrency,
        )
        self.counts = {"scored": 0, "no_opinion": 0}

    @staticmethod
    def check(options: RemoteOptions, where: str) -> None:
        if not options.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{where}: 'url' {options.url!r} is not an http(s) URL; e.g. http://localhost:5000/get_reward"
            )
        if "{response}" not in options.query:
            raise ConfigError(f"{where}: 'query' template {options.query!r} has no {{response}}")
        if min(options.batch_size, options.max_concurrency) < 1:
            raise ConfigError(f"{where}: batch_size and max_concurrency must be >= 1")
        if options.max_retries < 0 or options.timeout <= 0:
            raise ConfigError(f"{where}: max_retries must be >= 0 and timeout > 0")

    def __repr__(self) -> str:
        return f"RemoteReward(name={self.name!r}, backend={self.backend!r})"

    def score(
        self, prompts: list[Prompt], responses: list[str], context: ScoreContext | None = None
    ) -> torch.Tensor:
        """(B,) the server's scores, NaN where it answered null; JudgeError when it fails (after retries)."""
        check_batch(prompts, responses)
        labels = [""] * len(responses)
        if self.options.label_column:
            if context is None or self.options.label_column not in context.columns:
                raise ValueError(
                    f"reward source '{self.name}' reads '{self.options.label_column}', not given"
                )
            labels = context.columns[self.options.label_column]
        size = self.options.batch_size
        payloads = [
            {
                "query": [
                    fill(self.options.query, p, r)
                    for p, r in zip(prompts[i : i + size], responses[i : i + size])
                ],
                "prompts": [prompt_text(p) for p in prompts[i : i + size]],
                "labels": labels[i : i + size],
            }
            for i in range(0, len(responses), size)
        ]
        batches: list[list[float]] = [[] for _ in payloads]
        for j, scores in self.backend.complete(payloads):
            batches[j] = scores
        values = [v for batch in batches for v in batch]
        self.counts["scored"] += len(values)
        self.counts["no_opinion"] += sum(math.isnan(v) for v in values)
        return as_scores(values, len(values), self.name)

    def metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.counts.items()}
        out.update({f"backend_{k}": float(v) for k, v in self.backend.counts.items()})
        return out
