"""Where a judge's answers come from: an OpenAI-compatible HTTP endpoint or a local causal LM.

A backend turns chat conversations (lists of {"role", "content"} messages) into answer strings:

    backend.complete(conversations) -> iterator of (index, answer), in the order answers arrive

and names itself in `backend.identity` (endpoint, model, decoding settings; never a secret), which
keys the judge cache. The HTTP backend uses only the standard library (urllib, a thread pool).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
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
    """


def _retry_after(value: str | None) -> float | None:
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


class HTTPChatBackend:
    """Chat completions from an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, TGI, Ollama, ...).

    POSTs `{base_url}/chat/completions` with `{"model", "messages", "temperature", "max_tokens"}` and reads
    `choices[0].message.content`. The API key is read from the environment variable named by
    `api_key_env` when the backend is built and sent as `Authorization: Bearer ...`; it is kept out
    of `repr`, logs and error messages. Requests run `max_concurrency` at a time in a thread pool.
    Timeouts, dropped connections, HTTP 408/409/429 and 5xx are retried up to `max_retries` times, waiting
    `backoff * 2**attempt` seconds (with jitter, at most `max_backoff`), or what the server's Retry-After
    header asks (also at most `max_backoff`); other HTTP errors raise JudgeError at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 256,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_concurrency: int = 8,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.timeout, self.max_retries, self.backoff, self.max_backoff = (
            timeout,
            max_retries,
            backoff,
            max_backoff,
        )
        self.max_concurrency = max_concurrency
        self.api_key_env = api_key_env
        self._api_key = None
        if api_key_env:
            self._api_key = os.environ.get(api_key_env)
            if not self._api_key:
                raise JudgeError(
                    f"the judge's API key is read from the environment variable {api_key_env}, which is not "
                    f"set; export {api_key_env}=... (or set api_key_env: null for an endpoint without a key)"
                )
        self.identity = json.dumps(
            {
                "backend": "http",
                "url": self.url,
                "model": model,
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
        )
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self.api_key_env else "none"
        return f"HTTPChatBackend(url={self.url!r}, model={self.model!r}, api_key={key})"

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        delay = self.backoff * 2**attempt
        return min(delay * random.uniform(0.5, 1.0), self.max_backoff)  # jitter spreads out retries

    def request(self, messages: list[dict]) -> str:
        """One chat completion (the answer text; '' when the endpoint sent no content), with retries."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            self._count("requests")
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())
                content = data["choices"][0]["message"].get("content")
                return content if isinstance(content, str) else ""
            except urllib.error.HTTPError as e:
                detail = e.read(300).decode("utf-8", "replace").strip() if e.fp else ""
                if e.code not in RETRYABLE_STATUS:
                    raise JudgeError(
                        f"judge endpoint {self.url} answered HTTP {e.code} {e.reason}: {detail[:300]} "
                        "(not retried: check base_url, model and the API key variable)"
                    ) from None
                reason, retry_after = f"HTTP {e.code}", _retry_after(e.headers.get("Retry-After"))
            except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
                why = getattr(e, "reason", None) or e
                reason = "timeout" if isinstance(why, TimeoutError) else f"{type(why).__name__}: {why}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
                reason = "a response that is not a chat completion"
            if attempt == self.max_retries:
                raise JudgeError(
                    f"judge endpoint {self.url} failed {self.max_retries + 1} times (last: {reason}); answers "
                    "received so far are in the judge cache, if one is set, and a rerun resumes from them"
                )
            delay = self._wait(attempt, retry_after)
            self._count("retries")
            self._count(
                "retries_" + ("timeout" if reason == "timeout" else reason.split(":")[0].replace(" ", "_"))
            )
            log.warning(
                "judge request to %s failed (%s); retry %d/%d in %.2fs",
                self.url,
                reason,
                attempt + 1,
                self.max_retries,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def complete(self, conversations: list[list[dict]]) -> Iterator[tuple[int, str]]:
        """(index, answer) for every conversation, as answers arrive; at most max_concurrency in flight."""
        if not conversations:
            return
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="judge")
        try:
            pending = {pool.submit(self.request, c): i for i, c in enumerate(conversations)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    yield i, future.result()  # re-raises a JudgeError here, in the caller's thread
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class LocalChatBackend:
    """Greedy answers from a local Hugging Face causal LM (`alignkit.generation.sample`, temperature 0).

    Conversations are rendered with the tokenizer's chat template (a plain 'Human:/Assistant:' format
    when it has none). The identity names the model path and settings, not its weights: after changing
    the weights at the same path, use a new cache file.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 16,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        import torch

        from alignkit.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(
            model, dtype=dtype, trust_remote_code=trust_remote_code, pad_token_id=self.tokenizer.pad_token_id
        )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device).eval()
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.identity = json.dumps(
            {
                "backend": "local",
                "model": model,
                "tokenizer": tokenizer or model,
                "max_new_tokens": max_new_tokens,
            }
        )
        self.counts: Counter = Counter()

    def __repr__(self) -> str:
        return f"LocalChatBackend({self.identity})"

    def complete(self, conversations: list[list[dict]]) -> Iterator[tuple[int, str]]:
        """(index, answer) for every conversation, in order, generated in batches."""
        from alignkit.data.chat import render_messages
        from alignkit.generation import sample

        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            texts = [render_messages(self.tokenizer, c, add_generation_prompt=True) for c in batch]
            self.counts["requests"] += len(texts)
            samples = sample(
                self.model,
                self.tokenizer,
                texts,
                temperature=0.0,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
            )
            for j, s in enumerate(samples):
                yield start + j, s.text
