"""The `generation:` section: how every command that samples draws completions, on which backend.

One section under the same keys in every sampling command (grpo, rloo, ppo, online-dpo, iterative-dpo,
distill, generate, eval), so a setting means the same everywhere: `generation.temperature`,
`generation.top_k`, `generation.top_p`, `generation.max_new_tokens`, `generation.batch_size`,
`generation.backend`, and vLLM's engine settings under `generation.vllm`. Each command keeps its own
defaults (`field(default_factory=lambda: GenerationSettings(max_new_tokens=48))`), and declares what only
it requires as `relations` on its class (online training needs a temperature above 0; eval and generate
take 0 = greedy). The flat keys these replaced (`temperature`, `generation_batch_size`, ...) are refused
with their new names (`SAMPLING_MOVED`, `config.load.moved_key`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from alignkit.config.load import above, at_least, between

BACKENDS = ("auto", "loop", "hf", "vllm")
"""auto: the lean KV-cache loop where it can drive the model, else transformers' generate (hf); vLLM is
never picked by itself, it is opted into (as TRL's use_vllm)."""
VLLM_MODES = ("colocate", "server")
WEIGHT_TRANSPORTS = ("auto", "http", "nccl")
"""How a trainer pushes its weights to an `alignkit vllm-serve` server (generation.weight_sync)."""


@dataclass
class VLLMSettings:
    """vLLM as the sampler (generation.backend=vllm; docs/vllm.md)."""

    mode: str = "colocate"
    """colocate (an engine in each training process, weights copied in before every rollout) or server
    (an `alignkit vllm-serve` process that the trainer samples from and pushes weights to)."""
    server_url: str = "http://127.0.0.1:8000"
    """mode=server: the `alignkit vllm-serve` address."""
    server_timeout: float = 300.0
    """mode=server: seconds to wait for the server to answer its health check before failing."""
    gpu_memory_utilization: float = 0.3
    """On a GPU: the share of its memory the colocated engine takes (weights + KV cache); the trainer
    keeps the rest."""
    cpu_kv_cache_gb: float = 1.0
    """On a CPU: GiB of memory the engine's KV cache takes."""
    max_model_len: int = 0
    """Longest prompt + completion the engine serves; 0 = max_prompt_length + max_new_tokens."""
    enforce_eager: bool = False
    """Run the engine without CUDA graphs (slower decoding, faster start, less memory)."""
    weight_transport: str = "auto"
    """mode=server: how the trainer's weights reach the server before each rollout: http (safetensors
    frames over HTTP; CPUs, small models), nccl (a NCCL broadcast from the trainer's GPU to the server's;
    untested until a GPU run), or auto (nccl when the policy is on a GPU, else http)."""
    weight_chunk_mb: float = 64.0
    """mode=server, weight_transport=http: MiB of tensors per frame of the upload (a larger tensor is a
    frame of its own); bounds the trainer's extra memory while it sends."""
    nccl_port: int = 51216
    """mode=server, weight_transport=nccl: the port of the weight-sync group's rendezvous, on the
    server's host (its first worker listens; the trainer's main process connects)."""

    ranges: ClassVar[dict] = {
        "mode": VLLM_MODES,
        "weight_transport": WEIGHT_TRANSPORTS,
        "weight_chunk_mb": above(0),
        "nccl_port": between(1, 65535),
        "server_timeout": above(0),
        "gpu_memory_utilization": between(0, 1, low_open=True),
        "cpu_kv_cache_gb": above(0),
        "max_model_len": at_least(0),
    }


@dataclass
class GenerationSettings:
    """How completions are sampled: the distribution (temperature, top_k, top_p), their length, how many
    at once, and the backend that draws them."""

    backend: str = "auto"
    """auto (the lean KV-cache loop where it can drive the model, else transformers' generate), loop, hf
    or vllm (opted into, never picked by auto; docs/vllm.md). The resolved backend is saved with the run."""
    max_new_tokens: int = 64
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy where the command takes it (eval, generate; training needs > 0)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = off: all tokens)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability (1 = off: all tokens)."""
    batch_size: int = 64
    """Completions generated at once (bounds generation memory; the loop and hf backends). With the loop
    and hf backends it also decides which random numbers each completion draws, so a resumed run keeps it."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """generation.backend=vllm: the engine's settings."""

    ranges: ClassVar[dict] = {
        "backend": BACKENDS,
        "max_new_tokens": at_least(1),
        "temperature": at_least(0),
        "top_k": at_least(0),
        "top_p": between(0, 1, low_open=True),
        "batch_size": at_least(1),
    }


SAMPLING_MOVED = {key: f"generation.{key}" for key in ("max_new_tokens", "temperature", "top_k", "top_p")}
"""The flat sampling keys every sampling command had before the `generation:` section (its `moved`, with
the command's own batch-size key)."""


def temperature_above_zero(why: str):
    """A `relations` check: generation.temperature > 0, for a command that needs a sampled distribution
    (`why` says what for)."""

    def check(cfg) -> str | None:
        t = cfg.generation.temperature
        return None if t > 0 else f"'generation.temperature' must be > 0 ({why}), got {t!r}"

    return check


def backend_is_not(backend: str, why: str):
    """A `relations` check: generation.backend is not `backend`, which this command cannot use (`why`)."""

    def check(cfg) -> str | None:
        if cfg.generation.backend != backend:
            return None
        return f"generation.backend={backend} is not available here: {why}"

    return check
