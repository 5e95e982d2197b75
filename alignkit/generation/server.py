"""vLLM as the sampler in server mode (`generation.backend: vllm`, `generation.vllm.mode: server`): the
trainer samples from an `alignkit vllm-serve` process (generation.serve) and pushes its weights to it.

`ServerSampler` is the trainer's side. It waits for the server's /health (up to
`generation.vllm.server_timeout`), pushes `full_weights(model)` once per version through the chosen
weight transport (generation.weight_sync) and resets the server's prefix cache, and posts each rollout's
prompts to /generate as token ids with one seed per prompt and every sampling field, getting back the ids
and the sampler's processed log-probs exactly as the colocated engine returns them (the server builds
them with the same `generation.vllm.sampling_params` and `completions`).

Under DDP (TRL's layout for server mode): every process takes part in gathering the weights (collective
under FSDP2 / ZeRO-3) but only the main process pushes them; the server then holds one copy of the
policy, and the NCCL group has one trainer rank, which is what makes the broadcast a single collective.
Each rollout, every process's prompts (and their seeds) are gathered to the main process, which sends them
in one /generate, and every process takes back its own slice: one large batch keeps the server's
scheduler full, and a prompt's samples depend only on its own seed, not on which process sent it. Only
the main process talks to the server, so no barrier is needed between the push and the next /generate.
"""

from __future__ import annotations

import time

import torch

from alignkit.generation.backends import Sampled
from alignkit.generation.sampling import sample_seed
from alignkit.generation.vllm import full_weights
from alignkit.generation.weight_sync import make_transport
from alignkit.generation.wire import request_json


def wait_for_server(url: str, timeout: float, *, interval: float = 1.0) -> dict:
    """The server's /health answer, waiting up to `timeout` seconds for one that says it is ready; a
    ConnectionError naming the URL, the timeout and how to start a server when none comes."""
    deadline = time.monotonic() + timeout
    last = "nothing answered"
    while True:
        try:
            health = request_json(url, "/health", timeout=max(0.1, min(interval * 5, timeout)))
            if health.get("status") == "ok":
                return health
            last = f"it answered {health.get('status', health)!r}"
        except (ConnectionError, RuntimeError) as e:
            last = str(e).removeprefix(f"vllm-serve at {url}: ")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionError(
                f"no vLLM server ready at {url} after waiting {timeout:g} s (generation.vllm.server_timeout; "
                f"last: {last}). Start one with `alignkit vllm-serve MODEL port=PORT` (the policy's `model`) "
                f"and point generation.vllm.server_url at it, or raise server_timeout if it is still loading "
                f"(docs/vllm.md, 'Server mode')"
            )
        time.sleep(min(interval, left))


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ServerSampler:
    """Samples from an `alignkit vllm-serve` server and pushes the trainer's weights to it (module
    docstring: what each process does under DDP)."""

    backend = "vllm"
    is_trainer = False

    def __init__(self, settings, *, eos: set[int]):
        """`settings`: the VLLMSettings (server_url, server_timeout, weight_transport, ...); `eos`: the
        token ids that end a completion (kept in it, as on every backend). Every process waits for the
        server, so that all of them fail alike, with the clear error, when it is not there."""
        self.settings, self.url, self.eos = settings, settings.server_url.rstrip("/"), sorted(eos)
        self.timeout = settings.server_timeout
        wait_for_server(self.url, self.timeout)
        self.version, self.transport = None, None

    def sync(self, model, version: int) -> None:
        """Push `model`'s weights (the unwrapped policy) to the server and reset its prefix cache, once per
        version. Every process reads them (gathered whole one tensor at a time under FSDP2 / ZeRO-3, a
        collective); the main one sends them."""
        if version == self.version:
            return
        main = world()[0] == 0
        if main and self.transport is None:  # built at the first push: the policy's device picks `auto`
            device = next(model.parameters()).device
            self.transport = make_transport(
                self.settings.weight_transport, self.url, device=device, settings=self.settings
            )
        weights = full_weights(model)
        if main:
            self.transport.push(weights)
            request_json(self.url, "/reset_prefix_cache", {}, timeout=self.timeout)
        else:
            for _ in weights:  # take part in the gathers
                pass
        self.version = version

    def sample(
        self, model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int, seed: int, **settings
    ) -> Sampled:
        """Prompt i is one request of n = num_samples, seeded `sample_seed(seed, i)` (as the colocated
        engine seeds it): a prompt's samples do not depend on which other prompts share the call.
        Settings: max_new_tokens, temperature, top_k, top_p (batch_size is the server's business)."""
        settings.pop("batch_size", None)
        seeds = [sample_seed(seed, i) % 2**63 for i in range(len(prompt_ids))]
        rank, size = world()
        if size == 1:
            return self.generate(prompt_ids, seeds, num_samples, settings)
        gathered = [None] * size  # every process's (prompts, seeds), in rank order
        torch.distributed.all_gather_object(gathered, (prompt_ids, seeds))
        answer = [None]
        if rank == 0:
            prompts = [p for ids, _ in gathered for p in ids]
            every = self.generate(prompts, [s for _, ss in gathered for s in ss], num_samples, settings)
            answer = [(every.completion_ids, every.logps)]
        torch.distributed.broadcast_object_list(answer, src=0)
        ids, logps = answer[0]
        start = sum(len(p) for p, _ in gathered[:rank]) * num_samples
        end = start + len(prompt_ids) * num_samples
        return Sampled(ids[start:end], logps[start:end])

    def generate(
        self, prompt_ids: list[list[int]], seeds: list[int], num_samples: int, settings: dict
    ) -> Sampled:
        """One /generate: completions of `prompt_ids`, prompt-major, num_samples each."""
        answer = request_json(
            self.url,
            "/generate",
            {"prompts": prompt_ids, "seeds": seeds, "n": num_samples, "eos": self.eos, "settings": settings},
            timeout=None,  # a rollout takes as long as it takes; a dead server closes the connection
        )
        return Sampled(answer["completion_ids"], answer["logps"])
