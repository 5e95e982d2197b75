"""Where a judge's answers come from: an OpenAI-compatible HTTP endpoint or a local causal LM
(the Anthropic and Bedrock backends, which need their SDKs, are in `backends_cloud`).

A backend turns chat conversations (lists of {"role", "content"} messages) into answer strings:

    backend.complete(conversations) -> iterator of (index, answer), in the order answers arrive

and names itself in `backend.identity` (endpoint, model, decoding settings; never a secret), which
keys the judge cache. The HTTP backend uses only the standard library (urllib, a thread pool); its
retry loop, thread pool and redaction of secrets (`RemoteChatBackend`) and its POST (`post_json`) serve
every remote backend, and the remote reward server (`rewards.remote`).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

log = logging.getLogger("alignkit.rewards")

# Worth retrying: the server is busy (429), failing (5xx) or timed out (408); anything else in 4xx is
# a problem with the request (URL, model, key) that asking again will not fix.
RETRYABLE_STATUS = {408, 409, 429} | set(range(500, 600))


class JudgeError(ValueError):
    """The judge cannot be used: an endpoint that refuses the request, or keeps failing after retries.

    A ValueError, so that the CLI prints its message (which never holds the API key) without a traceback.
    `row_level`: the failure is about this one request (it kept failing after the retries, or the endpoint
    refused its content: HTTP 400, 413, 422), so a judge with on_error=fallback gives that row the fallback
    and goes on; otherwise (a bad key, URL or model) every request would fail the same way, and the run stops.
    """

    def __init__(self, message: str, row_level: bool = False):
        super().__init__(message)
        self.row_level = row_level


ROW_LEVEL_STATUS = {400, 413, 422}  # the request's content was refused, not the key, URL or model
# Header values that carry a credential, in any message: `Authorization: Bearer sk-...`, `x-api-key: ...`.
SECRET_HEADER = re.compile(
    r"(?i)((?:authorization|x-api-key|api[-_]key)[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?|\bbearer\s+)[^\s\"',;})]+"
)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with every secret blanked to '***', also as it appears JSON-escaped, URL-quoted or repr'd
    (a server may echo it so), and the value of every credential header, whatever the secret."""
    for secret in secrets:
        if not secret or len(secret) < 4:  # a shorter value would blank ordinary words
            continue
        forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret)[1:-1].replace("/", "\\/")}
        forms |= {urllib.parse.quote(secret, safe=""), repr(secret)[1:-1]}
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "***")
    return SECRET_HEADER.sub(lambda m: m.group(1) + "***", text)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Retry(Exception):
    """One failed attempt that asking again may fix: why (for logs and counters), and the server's
    Retry-After in seconds, if it sent one. Raised by `RemoteChatBackend.send`, never seen by callers."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class RemoteChatBackend:
    """Retries, back-off, concurrency and secret-keeping shared by the backends that call a service.

    A subclass sets `target` (where requests go, for messages; no secret) and `identity`, and implements
    `send(messages) -> answer`: one attempt, raising `Retry(reason, retry_after)` for a failure worth
    repeating (a timeout, a dropped connection, HTTP 408/409/429/5xx, a malformed answer) and JudgeError
    for one that is not. `request` retries up to `max_retries` times, waiting `backoff * 2**attempt`
    seconds (with jitter, at most `max_backoff`), or what the server's Retry-After asks (also at most
    `max_backoff`); `complete` runs `max_concurrency` requests at a time in a thread pool. Every text in
    a raised message or a log line passes through `redact`, which blanks the backend's secrets.
    """

    target = "?"
    service = "judge endpoint"
    """What the backend calls, as messages name it."""
    gave_up = (
        "answers received so far are in the judge cache, if one is set, and a rerun resumes "
        "from them (or set on_error: fallback to score such rows with the fallback, marked)"
    )
    """What a message says to do after the last retry failed."""

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_concurrency: int = 8,
    ):
        self.timeout, self.max_retries, self.backoff, self.max_backoff = (
            timeout,
            max_retries,
            backoff,
            max_backoff,
        )
        self.max_concurrency = max_concurrency
        self._secrets: tuple[str, ...] = ()
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def send(self, messages):
        """One attempt at an answer (see the class docstring for what it raises)."""
        raise NotImplementedError

    def redact(self, text: str) -> str:
        """`text` with every secret of this backend, and any credential header, blanked (see `redact`)."""
        return redact(text, self._secrets)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        delay = self.backoff * 2**attempt
        return min(delay * random.uniform(0.5, 1.0), self.max_backoff)  # jitter spreads out retries

    def request(self, messages):
        """One answer, with retries; JudgeError when the service refuses or keeps failing. (`messages` is
        whatever `send` takes: a conversation for a chat backend, a batch for a remote reward.)"""
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            try:
                answer = self.send(messages)
                return self.redact(answer) if isinstance(answer, str) else answer
            except JudgeError as e:
                raise JudgeError(self.redact(str(e)), e.row_level) from None
            except Retry as e:
                reason, retry_after = self.redact(e.reason), e.retry_after
            except Exception as e:  # anything else (e.g. a key the HTTP library refuses) may quote the key
                raise JudgeError(
                    self.redact(f"{self.service} {self.target}: {type(e).__name__}: {e}")
                ) from None
            if attempt == self.max_retries:
                raise JudgeError(
                    f"{self.service} {self.target} failed {self.max_retries + 1} times (last: {reason}); "
                    + self.gave_up,
                    row_level=True,
                )
            delay = self._wait(attempt, retry_after)
            self._count("retries")
            self._count(
                "retries_" + ("timeout" if reason == "timeout" else reason.split(":")[0].replace(" ", "_"))
            )
            log.warning(
                "request to %s %s failed (%s); retry %d/%d in %.2fs",
                self.service,
                self.target,
                reason,
                attempt + 1,
                self.max_retries,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def complete(
        self, conversations: list[list[dict]], row_errors: bool = False
    ) -> Iterator[tuple[int, str | JudgeError]]:
        """(index, answer) for every conversation, as answers arrive; at most max_concurrency in flight.
        A JudgeError is raised, or with `row_errors` one about that row alone (`row_level`) is yielded
        in place of its answer."""
        if not conversations:
            return
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="judge")
        try:
            pending = {pool.submit(self.request, c): i for i, c in enumerate(conversations)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    error = future.exception()
                    if error is None:
                        yield i, future.result()
                    elif row_errors and isinstance(error, JudgeError) and error.row_level:
                        yield i, error
                    else:
                        raise error  # here, in the caller's thread
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class HTTPChatBackend(RemoteChatBackend):
    """Chat completions from an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, TGI, Ollama, ...).

    POSTs `{base_url}/chat/completions` with `{"model", "messages", "temperature", "max_tokens"}` (and
    `extra_body`'s fields: a structured-output constraint) and reads `choices[0].message.content`. The API key is read from the environment variable named by
    `api_key_env` when the backend is built and sent as `Authorization: Bearer ...`; it is kept out
    of `repr`, logs and error messages. Timeouts, dropped connections, HTTP 408/409/429 and 5xx are
    retried (see `RemoteChatBackend`); other HTTP errors raise JudgeError at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        extra_body: dict | None = None,
        **retries,
    ):
        super().__init__(**retries)
        self.extra_body = extra_body or {}
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.target = self.url
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.api_key_env = api_key_env
        self._api_key = read_api_key(api_key_env, "or set api_key_env: null for an endpoint without a key")
        self._secrets = (self._api_key,) if self._api_key else ()
        self.identity = json.dumps(
            {
                "backend": "http",
                "url": self.url,
                "model": model,
                "temperature": temperature,
                "max_tokens": max_tokens,
                **({"constraint": self.extra_body} if self.extra_body else {}),
            }
        )

    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self.api_key_env else "none"
        return f"HTTPChatBackend(url={self.url!r}, model={self.model!r}, api_key={key})"

    def send(self, messages: list[dict]) -> str:
        """One chat completion (the answer text; '' when the endpoint sent no content)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                **self.extra_body,
            }
        ).encode()
        data = post_json(
            self.url,
            body,
            self._api_key,
            timeout=self.timeout,
            redact=self.redact,
            service=self.service,
            hint="check base_url, model and the API key variable",
        )
        try:
            content = data["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise Retry("a response that is not a chat completion") from None
        return content if isinstance(content, str) else ""


def post_json(url: str, body: bytes, api_key: str | None, *, timeout: float, redact, service: str, hint: str):
    """One POST of the JSON `body` to `url` (with `Authorization: Bearer <api_key>` when a key is given) and
    its answer, decoded; one attempt of a `RemoteChatBackend.send`: raises `Retry` for a timeout, a dropped
    connection, HTTP 408/409/429/5xx (with the server's Retry-After) or a response that is not JSON, and
    JudgeError for any other HTTP error (`row_level` for 400/413/422; the message ends with `hint`, what to
    check, and passes through `redact`, as does the server's answer quoted in it)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        # Blanked before it is cut, so that a key echoed across the cut cannot leak in part.
        detail = redact(e.read(8192).decode("utf-8", "replace").strip()) if e.fp else ""
        if e.code not in RETRYABLE_STATUS:
            raise JudgeError(
                redact(
                    f"{service} {url} answered HTTP {e.code} {e.reason}: {detail[:300]} (not retried: {hint})"
                ),
                row_level=e.code in ROW_LEVEL_STATUS,
            ) from None
        raise Retry(f"HTTP {e.code}", retry_after_seconds(e.headers.get("Retry-After"))) from None
    except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
        why = getattr(e, "reason", None) or e
        raise Retry("timeout" if isinstance(why, TimeoutError) else f"{type(why).__name__}: {why}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Retry("a response that is not JSON") from None


def read_api_key(env: str | None, alternative: str) -> str | None:
    """The API key in the environment variable `env` (None when `env` is None); JudgeError when unset.

    `alternative` ends the message with the other way out, e.g. "or set api_key_env: null ...".
    """
    if not env:
        return None
    key = (os.environ.get(env) or "").strip()  # a newline pasted with the key is never part of it
    if not key:
        raise JudgeError(
            f"the judge's API key is read from the environment variable {env}, which is not set; "
            f"export {env}=... ({alternative})"
        )
    return key


class LocalChatBackend:
    """Greedy answers from a local Hugging Face causal LM (`alignkit.generation.sampling.sample`, temperature 0),
    or, with engine="vllm", from a vLLM engine of its own (`generation.vllm.ColocatedVLLM.frozen`).

    Conversations are rendered with the tokenizer's chat template and `chat_template_kwargs` (a plain
    'Human:/Assistant:' format when it has none) and encoded with one BOS (`generation.sample` uses the
    one prompt encoder). The identity names the model path and settings, not its weights: after changing
    the weights at the same path, use a new cache file.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 16,
        *,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        chat_template_kwargs: dict | None = None,
        engine: str = "hf",
        vllm_settings=None,
    ):
        import torch

        from alignkit.models.load import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
        self.template_kwargs = dict(chat_template_kwargs or {})
        if self.template_kwargs and not self.tokenizer.chat_template:
            raise ValueError(f"chat_template_kwargs is set, but {tokenizer or model} has no chat template")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.engine = None, None
        if engine == "vllm":  # the engine loads the weights itself; no transformers copy beside it
            from alignkit.config.generation import VLLMSettings
            from alignkit.generation.vllm import ColocatedVLLM

            self.engine = ColocatedVLLM.frozen(
                model,
                self.tokenizer,
                settings=vllm_settings or VLLMSettings(),
                max_model_len=0,  # the model's own, unless vllm.max_model_len says
                dtype=dtype,
                device=device,
                trust_remote_code=trust_remote_code,
            )
        else:
            self.model = load_causal_lm(  # it only answers, with its own forward: no log-probs to check
                model,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                pad_token_id=self.tokenizer.pad_token_id,
                check_logps=False,
            )
            self.model.to(device).eval()
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.identity = json.dumps(
            {
                "backend": "local",
                "model": model,
                "tokenizer": tokenizer or model,
                "max_new_tokens": max_new_tokens,
                **({"chat_template_kwargs": self.template_kwargs} if self.template_kwargs else {}),
                **({"engine": engine} if engine != "hf" else {}),  # (hf: the key caches were written under)
            }
        )
        self.counts: Counter = Counter()

    def __repr__(self) -> str:
        return f"LocalChatBackend({self.identity})"

    def complete(
        self, conversations: list[list[dict]], row_errors: bool = False
    ) -> Iterator[tuple[int, str]]:
        """(index, answer) for every conversation, in order, generated in batches (no row errors here)."""
        from alignkit.data.chat import render_messages
        from alignkit.data.prompts import encode_prompt
        from alignkit.generation.sampling import sample

        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            texts = [
                render_messages(
                    self.tokenizer, c, add_generation_prompt=True, template_kwargs=self.template_kwargs
                )
                for c in batch
            ]
            self.counts["requests"] += len(texts)
            if self.engine is not None:
                ids = [encode_prompt(self.tokenizer, t) for t in texts]  # the one prompt encoder: one BOS
                greedy = dict(max_new_tokens=self.max_new_tokens, temperature=0.0)
                drawn = self.engine.sample(None, self.tokenizer, ids, num_samples=1, seed=0, **greedy)
                answers = self.tokenizer.batch_decode(drawn.completion_ids, skip_special_tokens=True)
            else:
                samples = sample(
                    self.model,
                    self.tokenizer,
                    texts,
                    temperature=0.0,
                    max_new_tokens=self.max_new_tokens,
                    batch_size=self.batch_size,
                )
                answers = [s.text for s in samples]
            for j, answer in enumerate(answers):
                yield start + j, answer
