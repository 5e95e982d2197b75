"""An LLM judge (RLAIF): a prompt template, an answer, a score parsed from the answer's free text.

Pointwise (`JudgeReward.score`): the judge reads a prompt and one response and answers with a
justification and a score, e.g. "...\nScore: 4.25". `judge_answers.parse_score` finds the score in free text
("Score: 4.5", "**4/5**", "I'd give it 3.25 out of 5", a bare "4") and checks it is in the template's
range. An answer with no score, conflicting scores or one out of range is asked again with a repair
turn ("reply with only: Score: <number>") up to `parse_retries` times; if it still fails, the row
gets `fallback` (by default the middle of the range, never a silent 0) and is counted in `metrics()`.

Pairwise (`JudgeReward.compare`): "which response is better, A or B?", for building preference
pairs. LLM judges favour a position (often the first; Zheng et al. 2023, "Judging LLM-as-a-Judge"),
so each pair is asked in both orders: P(a better) is 1 or 0 when the two verdicts agree and 0.5
when they contradict each other (counted as `position_inconsistent`).

Answers are cached in SQLite (`cache: path`) under (judge identity, template, prompt, response)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import torch

from alignkit.config.generation import VLLMSettings
from alignkit.config.load import ConfigError, from_mapping
from alignkit.models.load import DTYPES
from alignkit.rewards.backends import HTTPChatBackend, JudgeError, LocalChatBackend, log
from alignkit.rewards.backends_cloud import SDKS, AnthropicBackend, BedrockBackend, require_sdk
from alignkit.rewards.base import Prompt, SourceOptions, as_scores, check_batch, fill, prompt_text
from alignkit.rewards.cache import JudgeCache, cache_key
from alignkit.rewards.judge_answers import TEMPLATES, JudgeTemplate, parse_preference, parse_score


@dataclass
class JudgeOptions(SourceOptions):
    """An LLM judge: a template, a backend (http, anthropic, bedrock or local), parsing with retries, an
    optional cache."""

    backend: str = "http"
    """Where answers come from: http (an OpenAI-compatible endpoint), anthropic (the Messages API),
    bedrock (Amazon Bedrock's Converse API) or local (a causal LM)."""
    template: str = "summary"
    """A built-in template (summary, toxicity, pairwise) or your own text with {prompt} and {response}."""
    system: str | None = None
    """System message for your own template (built-in templates have theirs)."""
    min_score: float | None = None
    """Lowest valid score of your own template (built-in templates fix their range)."""
    max_score: float | None = None
    """Highest valid score of your own template."""
    fallback: float | None = None
    """Score given when no valid score could be parsed (default: the middle of the range); counted."""
    on_error: str = "raise"
    """raise (a row the endpoint keeps failing on, or refuses, stops the run) or fallback (that row gets
    `fallback`, counted as fallbacks_error and marked per row by `alignkit score`)."""
    parse_retries: int = 2
    """Times an unparseable or out-of-range answer is asked again, with a request for the format."""
    cache: str | None = None
    """SQLite file caching answers (a rerun asks nothing again); none = no cache."""
    model: str = ""
    """http: the model name the endpoint serves; anthropic: a Claude model (claude-...); bedrock: a model
    id or inference profile (anthropic.claude-3-haiku-20240307-v1:0); local: a hub name or directory."""
    base_url: str | None = None
    """http: the endpoint's base URL (…/v1; default https://api.openai.com/v1), /chat/completions is
    appended; anthropic: the API's base URL (default the client's, https://api.anthropic.com)."""
    api_key_env: str | None = None
    """http, anthropic: name of the environment variable holding the API key (never the key itself);
    http default: no key; anthropic default: ANTHROPIC_API_KEY."""
    region: str | None = None
    """bedrock: AWS region (default: AWS_REGION, AWS_DEFAULT_REGION or the AWS profile's region)."""
    endpoint_url: str | None = None
    """bedrock: a bedrock-runtime endpoint other than the region's (a VPC endpoint, a proxy, a test server)."""
    temperature: float | None = None
    """Sampling temperature. http: default 0.0; anthropic, bedrock: default none, i.e. not sent (the
    model's own; Claude models from Opus 4.7 on refuse the parameter); local decoding is always greedy."""
    max_tokens: int = 256
    """Longest answer, in tokens."""
    structured_output: str = "none"
    """http only: constrain the answer's form so that any model gives a parseable one (fewer parse retries):
    json (the portable OpenAI `response_format` JSON schema: {"score": number in the range}, or
    {"verdict": "A" | "B" | "tie"} for a pairwise template) or choice (vLLM's `structured_outputs` choice
    among the range's whole numbers, or A / B; vLLM servers only); none asks in free text."""
    timeout: float = 60.0
    """Remote backends: seconds to wait for one answer before retrying."""
    max_retries: int = 5
    """Remote backends: retries after a timeout, dropped connection, HTTP 429 or 5xx (throttling on
    Bedrock), with exponential back-off."""
    backoff: float = 1.0
    """Remote backends: first retry waits about this many seconds; each further one twice as long."""
    max_backoff: float = 60.0
    """Remote backends: longest wait between retries (also caps the server's Retry-After)."""
    max_concurrency: int = 8
    """Remote backends: requests in flight at once."""
    tokenizer: str | None = None
    """local: tokenizer to load (default: the model's)."""
    device: str = "auto"
    """local: auto (cuda if available), cpu, cuda, ..."""
    dtype: str = "float32"
    """local: weights dtype: float32, bfloat16, float16 or auto."""
    batch_size: int = 16
    """local: conversations generated at once."""
    trust_remote_code: bool = False
    """local: allow the model repository to run its own code. Off unless you trust the source."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """local: extra variables for the judge model's chat template, e.g. {enable_thinking: false} (Qwen3)."""
    engine: str = "hf"
    """local: what writes the answers: hf (transformers' generate, greedy) or vllm (a vLLM engine of the
    judge's own, loaded from `model` with no transformers copy beside it; docs/vllm.md)."""
    vllm: dict = field(default_factory=dict)
    """local, engine=vllm: the engine's memory and length settings (`generation.vllm`'s cpu_kv_cache_gb,
    gpu_memory_utilization, max_model_len, enforce_eager)."""


REMOTE = ("temperature", "timeout", "max_retries", "backoff", "max_backoff", "max_concurrency")


# backend -> the keys only it (and the others listed with it) reads; a key of another backend set away from
# its default is an error, not silently ignored.
BACKEND_KEYS = {
    "http": ("base_url", "api_key_env", "structured_output", *REMOTE),
    "anthropic": ("base_url", "api_key_env", *REMOTE),
    "bedrock": ("region", "endpoint_url", *REMOTE),
    "local": (
        "tokenizer",
        "device",
        "dtype",
        "batch_size",
        "trust_remote_code",
        "chat_template_kwargs",
        "engine",
        "vllm",
    ),
}


def resolve_template(options: JudgeOptions, where: str = "judge") -> JudgeTemplate:
    """The built-in template named by `options.template`, or one built from its text and range."""
    if options.template in TEMPLATES:
        if options.min_score is not None or options.max_score is not None or options.system is not None:
            raise ConfigError(
                f"{where}: the built-in '{options.template}' template fixes its system message and range; "
                "min_score, max_score and system are for your own template text"
            )
        return TEMPLATES[options.template]
    if "{prompt}" not in options.template and "{response}" not in options.template:
        raise ConfigError(
            f"{where}: template {options.template[:60]!r} is neither a built-in ({', '.join(TEMPLATES)}) "
            "nor a text using {prompt} and {response}"
        )
    if options.min_score is None or options.max_score is None or options.min_score >= options.max_score:
        raise ConfigError(f"{where}: your own template needs min_score < max_score (the range it asks for)")
    return JudgeTemplate(options.system, options.template, options.min_score, options.max_score)


JUDGE_ENGINES = ("hf", "vllm")


JUDGE_VLLM_KEYS = ("cpu_kv_cache_gb", "gpu_memory_utilization", "max_model_len", "enforce_eager")


def judge_engine_settings(given: dict) -> VLLMSettings:
    """A local judge's `vllm:` options as VLLMSettings (colocated: the judge's engine lives in this
    process); ConfigError for a key it does not read or a value out of range."""
    unknown = sorted(set(given) - set(JUDGE_VLLM_KEYS))
    if unknown:
        raise ConfigError(
            f"vllm: unknown key(s) {', '.join(unknown)}; a judge's engine reads {', '.join(JUDGE_VLLM_KEYS)}"
        )
    return from_mapping(VLLMSettings, given, "vllm")


def build_backend(o: JudgeOptions):
    """The backend `o.backend` names, built from the options it reads (see BACKEND_KEYS)."""
    if o.backend == "local":
        return LocalChatBackend(
            o.model,
            o.tokenizer,
            o.max_tokens,
            o.batch_size,
            device=o.device,
            dtype=o.dtype,
            trust_remote_code=o.trust_remote_code,
            chat_template_kwargs=o.chat_template_kwargs,
            engine=o.engine,
            vllm_settings=judge_engine_settings(o.vllm),
        )
    retries = {
        "timeout": o.timeout,
        "max_retries": o.max_retries,
        "backoff": o.backoff,
        "max_backoff": o.max_backoff,
        "max_concurrency": o.max_concurrency,
    }
    decoding = {"temperature": o.temperature, "max_tokens": o.max_tokens, **retries}
    if o.backend == "anthropic":
        return AnthropicBackend(o.model, base_url=o.base_url, api_key_env=o.api_key_env, **decoding)
    if o.backend == "bedrock":
        return BedrockBackend(o.model, region=o.region, endpoint_url=o.endpoint_url, **decoding)
    decoding["temperature"] = 0.0 if o.temperature is None else o.temperature
    constraint = answer_constraint(o.structured_output, resolve_template(o))
    return HTTPChatBackend(
        o.base_url or "https://api.openai.com/v1", o.model, o.api_key_env, extra_body=constraint, **decoding
    )


STRUCTURED_OUTPUTS = ("none", "json", "choice")


def answer_constraint(mode: str, template: JudgeTemplate) -> dict:
    """The request fields that constrain a judge's answer to `template`'s form (`JudgeOptions.
    structured_output`): {} for none; json, OpenAI's `response_format` with a JSON schema (a score in
    [low, high], or a verdict for a pairwise template); choice, vLLM's `structured_outputs` choice (the
    range's whole numbers, at most 101 of them, or A / B)."""
    if mode == "none":
        return {}
    if mode == "json":
        if template.pairwise:
            prop = {"verdict": {"type": "string", "enum": ["A", "B", "tie"]}}
        else:
            prop = {"score": {"type": "number", "minimum": template.low, "maximum": template.high}}
        schema = {"type": "object", "properties": prop, "required": list(prop), "additionalProperties": False}
        return {
            "response_format": {"type": "json_schema", "json_schema": {"name": "judgement", "schema": schema}}
        }
    if template.pairwise:
        return {"structured_outputs": {"choice": ["A", "B"]}}
    low, high = template.low, template.high
    if not (float(low).is_integer() and float(high).is_integer() and high - low <= 100):
        raise ConfigError(
            f"structured_output=choice needs a range of at most 101 whole numbers, the template's is "
            f"[{low:g}, {high:g}]: use structured_output=json"
        )
    return {"structured_outputs": {"choice": [str(v) for v in range(int(low), int(high) + 1)]}}


class JudgeReward:
    """An LLM judge as a reward source (`score`) and as a pairwise comparer (`compare`)."""

    def __init__(self, options: JudgeOptions):
        self.check(options, f"judge '{options.name}'")
        self.options, self.name, self.weight = options, options.name, options.weight
        self.template = resolve_template(options)
        self.backend = build_backend(options)
        self.cache = JudgeCache(options.cache) if options.cache else None
        self.counts: Counter = Counter()
        self.last_fallbacks: list[bool] = []  # per row of the last score(): it got the fallback score

    @staticmethod
    def check(options: JudgeOptions, where: str) -> None:
        if options.backend not in BACKEND_KEYS:
            raise ConfigError(f"{where}: backend '{options.backend}' is not one of {', '.join(BACKEND_KEYS)}")
        if not options.model:
            raise ConfigError(
                f"{where}: 'model' is required (the served model name, a Claude model, a Bedrock model id, "
                "or a local model)"
            )
        default, used = JudgeOptions(), BACKEND_KEYS[options.backend]
        for key in dict.fromkeys(k for keys in BACKEND_KEYS.values() for k in keys if k not in used):
            if getattr(options, key) != getattr(default, key):
                raise ConfigError(
                    f"{where}: '{key}' has no effect with backend {options.backend} (which reads "
                    f"{', '.join(used)}); remove it"
                )
        if options.on_error not in ("raise", "fallback"):
            raise ConfigError(f"{where}: on_error '{options.on_error}' is not raise or fallback")
        if options.engine not in JUDGE_ENGINES:
            raise ConfigError(f"{where}: engine '{options.engine}' is not one of {', '.join(JUDGE_ENGINES)}")
        if options.vllm and options.engine != "vllm":
            raise ConfigError(
                f"{where}: 'vllm' settings have no effect with engine {options.engine}; remove them"
            )
        try:
            judge_engine_settings(options.vllm)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if options.dtype not in DTYPES:
            raise ConfigError(f"{where}: dtype '{options.dtype}' is not one of {', '.join(DTYPES)}")
        if min(options.max_concurrency, options.batch_size, options.max_tokens) < 1:
            raise ConfigError(f"{where}: max_concurrency, batch_size and max_tokens must be >= 1")
        if min(options.parse_retries, options.max_retries) < 0 or options.timeout <= 0:
            raise ConfigError(f"{where}: parse_retries and max_retries must be >= 0 and timeout > 0")
        if options.backend in SDKS:  # a missing SDK stops the run now, before any source is built
            require_sdk(options.backend, where)
        template = resolve_template(options, where)
        if options.structured_output not in STRUCTURED_OUTPUTS:
            raise ConfigError(
                f"{where}: structured_output '{options.structured_output}' is not one of "
                f"{', '.join(STRUCTURED_OUTPUTS)}"
            )
        answer_constraint(options.structured_output, template)  # (a range choice cannot list: refused now)
        if options.fallback is not None and not template.low <= options.fallback <= template.high:
            raise ConfigError(
                f"{where}: fallback {options.fallback} is outside [{template.low}, {template.high}]"
            )

    def __repr__(self) -> str:
        return f"JudgeReward(name={self.name!r}, backend={self.backend!r}, cache={self.cache!r})"

    @property
    def fallback(self) -> float:
        t = self.template
        return self.options.fallback if self.options.fallback is not None else (t.low + t.high) / 2

    def _messages(self, user: str) -> list[dict]:
        system = [{"role": "system", "content": self.template.system}] if self.template.system else []
        return [*system, {"role": "user", "content": user}]

    def _repair(self) -> str:
        if self.template.pairwise:
            return "Reply with only one line: Verdict: A, or Verdict: B."
        t = self.template
        return f"Your reply did not state a valid score. Reply with only one line: Score: <a number from {t.low:g} to {t.high:g}>."

    def _parse(self, answer: str) -> tuple[float | None, str | None]:
        if self.template.pairwise:
            return parse_preference(answer)
        return parse_score(answer, self.template.low, self.template.high)

    def ask(self, items: list[tuple[str, str, str]]) -> list[float | None]:
        """Parsed answers for `(prompt, response key, user message)` items; None where parsing failed.

        Answers come from the cache when present (parsed again, so a better parser or range applies);
        the rest are asked, re-asked with a repair turn when unparseable, and each final answer is
        committed to the cache as it arrives.
        """
        judge, template = self.backend.identity, self.template.identity
        keys = [cache_key(judge, template, p, r) for p, r, _ in items]
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        results: list[float | None] = [None] * len(items)
        reasons: list[str | None] = [None] * len(items)
        todo = []
        for i, key in enumerate(keys):
            if key in cached:
                self.counts["cache_hits"] += 1
                results[i], reasons[i] = self._parse(cached[key][0])
            else:
                todo.append(i)
        conversations = {i: self._messages(items[i][2]) for i in todo}
        for attempt in range(self.options.parse_retries + 1):
            retry = []
            pending = list(conversations)
            row_errors = self.options.on_error == "fallback"
            for j, answer in self.backend.complete([conversations[i] for i in pending], row_errors):
                i = pending[j]
                if isinstance(answer, JudgeError):  # this row kept failing: the fallback, counted
                    results[i], reasons[i] = None, "error"
                    log.warning("judge '%s': %s; the row gets the fallback score", self.name, answer)
                    continue
                self.counts["answers"] += 1
                value, reason = self._parse(answer)
                if value is None and attempt < self.options.parse_retries:
                    retry.append(i)
                    conversations[i] = [
                        *conversations[i],
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": self._repair()},
                    ]
                    continue
                results[i], reasons[i] = value, reason
                if self.cache is not None:
                    prompt, response, _ = items[i]
                    self.cache.put(
                        keys[i],
                        judge,
                        template,
                        prompt,
                        response=response,
                        answer=answer,
                        score=value
                        if isinstance(value, float)
                        else None,  # (a ranking is re-read from the answer)
                    )
            self.counts["parse_retries"] += len(retry)
            conversations = {i: conversations[i] for i in retry}
            if not conversations:
                break
        for reason in reasons:
            if reason:
                self.counts["fallbacks"] += 1
                self.counts[f"fallbacks_{reason}"] += 1
        return results

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        """(B,) the judge's scores; `fallback` where no valid score was given (counted in metrics)."""
        check_batch(prompts, responses)
        if self.template.pairwise:
            raise ValueError(f"judge '{self.name}' has a pairwise template: use compare(), not score()")
        items = [(prompt_text(p), r, fill(self.template.user, p, r)) for p, r in zip(prompts, responses)]
        values = self.ask(items)
        self.counts["scored"] += len(values)
        self.last_fallbacks = [v is None for v in values]
        return as_scores([self.fallback if v is None else v for v in values], len(values), self.name)

    def compare(
        self, prompts: list[Prompt], responses_a: list[str], responses_b: list[str], both_orders: bool = True
    ) -> torch.Tensor:
        """(B,) P(response a is better than b): 1, 0, or 0.5 for a tie or a position-inconsistent pair.

        A verdict that cannot be parsed (after the retries) counts as 0.5 and as a fallback in metrics.

        With `both_orders` each pair is also asked with b shown first, and the two verdicts averaged
        (agreeing verdicts give 1 or 0, contradicting ones 0.5), which cancels the judge's position bias.
        """
        check_batch(prompts, responses_a)
        check_batch(prompts, responses_b)
        if not self.template.pairwise:
            raise ValueError(
                f"judge '{self.name}' has a pointwise template: use score(), or template: pairwise"
            )

        def item(p: Prompt, first: str, second: str) -> tuple[str, str, str]:
            p = prompt_text(p)  # a conversation's content, not a chat template's markup
            user = self.template.user.replace("{prompt}", p)
            user = user.replace("{response_a}", first).replace("{response_b}", second)
            return p, json.dumps([first, second], ensure_ascii=False), user

        items = [item(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)]
        if both_orders:
            items += [item(p, b, a) for p, a, b in zip(prompts, responses_a, responses_b)]
        values = self.ask(items)
        n = len(prompts)
        forward = torch.tensor([0.5 if v is None else v for v in values[:n]])
        if not both_orders:
            return forward.float()
        backward = 1.0 - torch.tensor([0.5 if v is None else v for v in values[n:]])  # b was shown first
        both_parsed = torch.tensor([a is not None and b is not None for a, b in zip(values[:n], values[n:])])
        self.counts["position_inconsistent"] += int((both_parsed & (forward != backward)).sum())
        self.counts["compared"] += n
        return ((forward + backward) / 2).float()

    def metrics(self) -> dict[str, float]:
        """Counters since the judge was built: answers, cache_hits, parse_retries, fallbacks (by reason),
        position_inconsistent, and the backend's requests and retries (by cause)."""
        out = {k: float(v) for k, v in self.counts.items()}
        out.update({f"backend_{k}": float(v) for k, v in self.backend.counts.items()})
        return out
