"""Judge backends behind a vendor SDK: Anthropic's Messages API (`anthropic`) and Amazon Bedrock's
Converse API (`boto3`).

Each SDK is an optional extra (`pip install "alignkit[anthropic]"`, `"alignkit[bedrock]"`), imported
when a judge with that backend is checked or built, never when this module is loaded. The SDKs' own
retries are switched off: `RemoteChatBackend` retries, backs off, counts and logs the same way for every
remote backend, so `max_retries`, `backoff`, the `backend_retries_*` counters and the error messages mean
the same thing whichever service answers.

Both services take the system prompt apart from the turns, which must alternate user / assistant
starting with a user turn, as the judge's conversations do (user, then assistant + repair user turns).
"""

from __future__ import annotations

import importlib
import json
from types import ModuleType

from alignkit.config.load import ConfigError
from alignkit.rewards.backends import (
    RETRYABLE_STATUS,
    JudgeError,
    RemoteChatBackend,
    Retry,
    read_api_key,
    retry_after_seconds,
)

# backend -> (module to import, pip package, extra of alignkit that installs it)
SDKS = {"anthropic": ("anthropic", "anthropic", "anthropic"), "bedrock": ("boto3", "boto3", "bedrock")}


def require_sdk(backend: str, where: str) -> ModuleType:
    """The SDK module `backend` needs, imported; ConfigError naming the extra to install when it is missing."""
    module, package, extra = SDKS[backend]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"{where}: backend {backend} needs the {package} package, which cannot be imported ({e}); "
            f'install it with: pip install "alignkit[{extra}]"'
        ) from None


def split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """(system prompt or None, the other turns) of an OpenAI-style conversation."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return system or None, [m for m in messages if m["role"] != "system"]


class AnthropicBackend(RemoteChatBackend):
    """Claude through Anthropic's Messages API (`anthropic.Anthropic().messages.create`).

    The API key is read when the backend is built from the environment variable `api_key_env`
    (ANTHROPIC_API_KEY by default), passed to the client and kept out of `repr`, logs and messages.
    Error mapping: a timeout (`APITimeoutError`) or dropped connection (`APIConnectionError`) is retried,
    as is an `APIStatusError` with HTTP 408/409/429/5xx (rate limits, 500, 529 overloaded), waiting what
    its retry-after(-ms) header asks; any other status (400 bad request, 401 key, 403, 404 model) raises
    JudgeError at once with the API's message.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str | None = None,
        temperature: float | None = None,
        max_tokens: int = 256,
        **retries,
    ):
        super().__init__(**retries)
        anthropic = require_sdk("anthropic", "judge")
        self._sdk = anthropic
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.api_key_env = api_key_env or "ANTHROPIC_API_KEY"
        api_key = read_api_key(self.api_key_env, "the key of your Anthropic account")
        self._secrets = (api_key,)
        # max_retries=0: RemoteChatBackend retries, so that counters, logs and back-off match other backends
        self.client = anthropic.Anthropic(
            api_key=api_key, base_url=base_url, timeout=self.timeout, max_retries=0
        )
        self.url = str(self.client.base_url).rstrip("/")
        self.target = f"{self.url} (Anthropic Messages API)"
        self.identity = json.dumps(
            {
                "backend": "anthropic",
                "url": self.url,
                "model": model,
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
        )

    def __repr__(self) -> str:
        return f"AnthropicBackend(url={self.url!r}, model={self.model!r}, api_key=${self.api_key_env})"

    def send(self, messages: list[dict]) -> str:
        """One Messages API answer: the text blocks of `content`, joined ('' when there are none)."""
        sdk = self._sdk
        system, turns = split_system(messages)
        kwargs = {"system": system} if system else {}
        if self.temperature is not None:
            # in the body, as releases of the client after the parameter's deprecation have no argument for it
            kwargs["extra_body"] = {"temperature": self.temperature}
        try:
            reply = self.client.messages.create(
                model=self.model, max_tokens=self.max_tokens, messages=turns, **kwargs
            )
        except sdk.APITimeoutError:
            raise Retry("timeout") from None
        except sdk.APIConnectionError as e:
            raise Retry(f"connection error: {e}") from None
        except sdk.APIStatusError as e:
            status, detail = e.status_code, _anthropic_detail(e)
            if status not in RETRYABLE_STATUS:
                raise JudgeError(
                    f"judge endpoint {self.target} answered HTTP {status}: {detail[:300]} (not retried: "
                    f"check model, base_url and the key in ${self.api_key_env})"
                ) from None
            headers = e.response.headers
            wait_ms = retry_after_seconds(headers.get("retry-after-ms"))
            raise Retry(
                f"HTTP {status}: {detail[:100]}",
                wait_ms / 1000 if wait_ms is not None else retry_after_seconds(headers.get("retry-after")),
            ) from None
        except sdk.APIResponseValidationError:
            raise Retry("a response that is not a Messages API answer") from None
        except sdk.AnthropicError as e:  # the client's own refusals (its configuration, credentials)
            raise JudgeError(f"judge endpoint {self.target}: {type(e).__name__}: {e}") from None
        try:
            return "".join(block.text for block in reply.content if block.type == "text")
        except (AttributeError, TypeError):  # the SDK builds replies leniently: fields may be missing
            raise Retry("a response that is not a Messages API answer") from None


def _anthropic_detail(e) -> str:
    """The API's own error message ({"error": {"type", "message"}}), else the SDK's."""
    body = e.body if isinstance(e.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    if error.get("message"):
        return f"{error.get('type', 'error')}: {error['message']}"
    return str(e.message)


# Bedrock error codes worth asking again, whatever their HTTP status (ModelNotReady: a model loading).
BEDROCK_RETRYABLE = {
    "ThrottlingException",
    "TooManyRequestsException",
    "ServiceUnavailableException",
    "InternalServerException",
    "ModelNotReadyException",
    "ModelTimeoutException",
}


class BedrockBackend(RemoteChatBackend):
    """A model on Amazon Bedrock through the `bedrock-runtime` client's Converse API (`boto3`).

    `model` is a Bedrock model id or inference profile (`anthropic.claude-3-haiku-20240307-v1:0`,
    `us.anthropic.claude-3-5-haiku-20241022-v1:0`). The region is `region`, else the standard AWS
    configuration (AWS_REGION, AWS_DEFAULT_REGION, the profile's region); credentials come from the
    standard AWS chain (environment, AWS_PROFILE and ~/.aws, SSO, container or instance role) and are
    never logged or put in a message. Both are resolved when the backend is built, so a missing one
    stops the run before any scoring. Error mapping: a `ClientError` with HTTP 408/409/429/5xx or a
    throttling / unavailable / model-not-ready code is retried; a read or connect timeout and a dropped
    or refused connection are retried; anything else (ValidationException for a wrong model id,
    AccessDeniedException for a model without access, expired credentials) raises JudgeError at once.
    """

    def __init__(
        self,
        model: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        temperature: float | None = None,
        max_tokens: int = 256,
        **retries,
    ):
        super().__init__(**retries)
        boto3 = require_sdk("bedrock", "judge")
        import botocore.config
        import botocore.exceptions

        self._errors = botocore.exceptions
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        try:  # a profile that does not exist, an expired SSO login, ...
            session = boto3.session.Session(region_name=region)
            self.region = session.region_name
            credentials = session.get_credentials()
        except self._errors.BotoCoreError as e:
            raise JudgeError(f"judge backend bedrock: the AWS configuration cannot be used: {e}") from None
        if not self.region:
            raise JudgeError(
                "judge backend bedrock: no AWS region; set region: us-east-1 (say) in the judge's config, "
                "or AWS_REGION in the environment, or a region in your AWS profile"
            )
        if credentials is None:
            raise JudgeError(
                "judge backend bedrock: no AWS credentials found in the standard chain (AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, SSO, a container or instance role)"
            )
        frozen = credentials.get_frozen_credentials()
        self._secrets = tuple(s for s in (frozen.secret_key, frozen.token, frozen.access_key) if s)
        config = botocore.config.Config(
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            retries={"total_max_attempts": 1},  # RemoteChatBackend retries (see the module docstring)
            max_pool_connections=max(10, self.max_concurrency),
        )
        self.client = session.client("bedrock-runtime", endpoint_url=endpoint_url, config=config)
        self.endpoint_url = endpoint_url
        self.target = f"bedrock-runtime {self.region}" + (f" ({endpoint_url})" if endpoint_url else "")
        # The region is left out: one model id is the same model in every region, so moving for quota
        # keeps the cache. A custom endpoint (a proxy, a test server) is kept in.
        self.identity = json.dumps(
            {
                "backend": "bedrock",
                "model": model,
                "temperature": temperature,
                "max_tokens": max_tokens,
                **({"endpoint_url": endpoint_url} if endpoint_url else {}),
            }
        )

    def __repr__(self) -> str:
        return f"BedrockBackend(model={self.model!r}, region={self.region!r}, credentials=AWS chain)"

    def send(self, messages: list[dict]) -> str:
        """One Converse answer: the text blocks of output.message.content, joined."""
        system, turns = split_system(messages)
        kwargs = {"system": [{"text": system}]} if system else {}
        inference = {"maxTokens": self.max_tokens}
        if self.temperature is not None:
            inference["temperature"] = self.temperature
        errors = self._errors
        try:
            reply = self.client.converse(
                modelId=self.model,
                messages=[{"role": m["role"], "content": [{"text": m["content"]}]} for m in turns],
                inferenceConfig=inference,
                **kwargs,
            )
        except errors.ClientError as e:
            error, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            status, code = meta.get("HTTPStatusCode"), error.get("Code", "?")
            detail = f"{code}: {error.get('Message', '')}"[:300]
            if status not in RETRYABLE_STATUS and code not in BEDROCK_RETRYABLE:
                raise JudgeError(
                    f"judge endpoint {self.target} answered HTTP {status} {detail} (not retried: check the "
                    "model id, that your account has access to it in this region, and the AWS credentials)"
                ) from None
            retry_after = retry_after_seconds(meta.get("HTTPHeaders", {}).get("retry-after"))
            raise Retry(f"HTTP {status}: {detail[:100]}", retry_after) from None
        except (errors.ReadTimeoutError, errors.ConnectTimeoutError):
            raise Retry("timeout") from None
        except (errors.HTTPClientError, errors.ConnectionError) as e:  # closed or refused connections
            raise Retry(f"{type(e).__name__}: {e}") from None
        except errors.BotoCoreError as e:  # credentials that expired, a parameter the API refuses
            raise JudgeError(f"judge endpoint {self.target}: {e}") from None
        try:
            return "".join(block.get("text", "") for block in reply["output"]["message"]["content"])
        except (KeyError, TypeError, AttributeError):
            raise Retry("a response that is not a Converse answer") from None
