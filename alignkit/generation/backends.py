"""The one interface a rollout samples through, whatever the backend: a `Sampler` follows the policy's
weights (`sync`, before each rollout) and draws completions as token ids with the sampler's own log-probs
(`sample`). `rollout.make_sampler` picks it from the resolved `generation.backend`.

- loop / hf (`ModelSampler`): the trainer's own model samples (`generation.sampling.sample_ids`); nothing
  to sync, and its log-probs are the trainer's numbers up to rounding (`is_trainer`).
- vllm, colocated (`generation.vllm.ColocatedVLLM`): an engine in this process; `sync` copies the weights.
- vllm, server (`generation.server.ServerSampler`): an `alignkit vllm-serve` process; `sync` pushes them.
- a guide mixed in (`generation.guided.GuidedSampler`): the policy and a frozen guide decode together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from alignkit.generation.sampling import sample_ids


@dataclass
class Sampled:
    """Completions of a batch of prompts, prompt-major (`num_samples` per prompt)."""

    completion_ids: list[list[int]]
    """Each completion's ids as drawn, cut after its first EOS (kept when produced)."""
    logps: list[list[float]]
    """Each drawn token's log-prob under the distribution it was drawn from (tempered and truncated), as
    the sampler computed it; one per id."""
    details: dict[str, list[float]] = field(default_factory=dict)
    """Figures the sampler adds, one per completion by name (a guided sampler's: `generation.guided`)."""
    auto_correction: str = "sequence_mask"
    """The correction sampler_correction=auto applies where the sampler is not the trainer: sequence_mask for
    another engine's small numeric gap (vLLM; TRL's default), token_truncate for a guide's mixture."""


class Sampler(Protocol):
    """What a rollout needs from a backend."""

    backend: str
    """The resolved backend: loop, hf or vllm."""
    is_trainer: bool
    """Whether the sampler is the trainer's own model (its log-probs are the trainer's up to rounding); a
    vLLM engine is not (other kernels, other precision), so its tokens are slightly off-policy."""

    def sync(self, model, version: int) -> None:
        """Make the sampler draw from `model`'s current weights (the unwrapped policy); `version` names
        them (the step), so a second call for the same version costs nothing."""

    def sample(
        self, model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int, seed: int, **settings
    ) -> Sampled:
        """`num_samples` completions of every prompt; settings: max_new_tokens, temperature, top_k, top_p,
        batch_size (as `sample_ids` takes them)."""


class ModelSampler:
    """The trainer's model samples itself: the lean KV-cache loop or transformers' generate."""

    is_trainer = True

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def sync(self, model, version: int) -> None:
        """Nothing to do: the model is the policy."""

    def sample(
        self, model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int, seed: int, **settings
    ) -> Sampled:
        ids, logps = sample_ids(
            model,
            tokenizer,
            prompt_ids,
            num_samples=num_samples,
            seed=seed,
            backend=self.backend,
            with_logps=True,
            **settings,
        )
        return Sampled(ids, logps)
