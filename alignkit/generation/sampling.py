"""Batched sampling from a causal LM: the one place alignkit generates text.

Every sampled sequence draws its randomness from its own `torch.Generator`, seeded from
`(seed, index of the sample)` by a hash. Sampling is the Gumbel-max trick (argmax of log-probs plus Gumbel noise
is an exact draw from the softmax), so a sample depends only on the model, its prompt, the settings
and that pair — not on `batch_size`, on which other prompts share its batch, on left padding, or on
anything that ran before. This is the same contract as vLLM's per-request seeds. Two policies sampled
with the same seed see the same noise (common random numbers), which makes a before/after comparison
paired rather than merely matched in distribution.

Token ids are kept exactly as sampled: with tokenizers whose pieces carry the word boundary at their
end (the shipped TinyStories model), decoding a completion and encoding it again does not give back
the ids the model produced, so training on re-tokenised text would train on sequences it never wrote.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper

from alignkit.data.prompts import encode_prompt
from alignkit.generation.decode_loop import (
    cut_at_eos,
    draw_from,
    left_pad,
    loop_decoder,
    loop_generator,
    sample_ids_with_loop,
    sample_seed,
)
from alignkit.logprobs.transforms import truncation_warpers

SAMPLE_IDS_BACKENDS = ("auto", "loop", "hf")
"""The backends `sample_ids` draws with (generation.backend's others, vllm, sample elsewhere)."""


@dataclass
class Sample:
    """One sampled completion of one prompt."""

    prompt: str
    """The prompt as given."""
    prompt_ids: list[int]
    """The tokenizer's encoding of the prompt (with its special tokens, e.g. BOS), unpadded."""
    completion_ids: list[int]
    """The sampled ids, cut after the first EOS (which is kept when produced); never padded."""
    text: str
    """`completion_ids` decoded with `skip_special_tokens=True`."""


class _GumbelSampler(LogitsProcessor):
    """Adds Gumbel noise from one generator per row, so that greedy decoding of the result samples.

    `argmax_v(log p_v + g_v)` with `g_v = -log(E_v)`, `E_v ~ Exp(1)`, is distributed as `p` (the Gumbel-max
    trick); adding it to the already tempered and truncated scores samples from exactly the
    distribution `do_sample=True` would, with the randomness owned by each row rather than the batch.
    """

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, V = scores.shape  # (B, V)
        exponential = torch.stack(
            [
                torch.empty(V, device=scores.device, dtype=torch.float32).exponential_(generator=g)
                for g in self.generators
            ]
        )  # (B, V)
        return scores.float() - exponential.log()  # -inf (masked by top-k / top-p) stays -inf


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a completion: the generation config's EOS ids, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


def _check_counts(num_samples: int, max_new_tokens: int, batch_size: int) -> None:
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples, max_new_tokens and batch_size must be >= 1, got {num_samples}, "
            f"{max_new_tokens}, {batch_size}"
        )


def _settings(model, tokenizer, max_new_tokens, temperature, *, top_k, top_p, do_sample: bool = False):
    """(GenerationConfig, logits warpers, EOS ids) for sampling the model's own tempered, truncated
    softmax: penalties a checkpoint's generation_config may carry are off, so on-policy algorithms can
    score the samples with the model's log-probs."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token) "
            "before sampling"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample and temperature > 0,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,  # takes precedence over any min_length
        pad_token_id=pad_id,
        eos_token_id=sorted(eos) or None,
        bos_token_id=tokenizer.bos_token_id,
    )
    if config.do_sample:  # generate's own warpers stay off (top_k=0 drops its default 50): ours are passed
        config.temperature, config.top_k, config.top_p = 1.0, 0, 1.0
    return config, sampling_warpers(temperature, top_k=top_k, top_p=top_p), eos


def sampling_warpers(temperature: float, *, top_k: int | None = None, top_p: float | None = None) -> list:
    """The logits processors that turn a model's logits into the scores a sampler draws from: the temperature,
    then top-k and top-p (none for greedy decoding, temperature 0). The truncation is defined once, where
    training scores it (`alignkit.logprobs.transforms.truncation_warpers`)."""
    warpers = []
    if temperature > 0:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        warpers += truncation_warpers(top_k, top_p)
    return warpers


@torch.no_grad()
def sample_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    backend: str = "auto",
    with_logps: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Completion ids of `num_samples` samples of every prompt (token ids in, token ids out: no decode /
    re-encode round trip), prompt-major, each cut after its first EOS (kept when produced). with_logps:
    (ids, log-probs), the log-prob of each drawn token under the distribution it was drawn from (tempered
    and truncated), as the sampler computed it.

    The fast path for online RL. Contract on the distribution: the model's softmax at `temperature`
    (0 = greedy), truncated by top_k / top_p when given, nothing else. A call is reproducible from its
    `seed`, and the caller's RNG is untouched. Rows are decoded `batch_size` at a time (left-padded).

    For a standard decoder (`decode_loop.loop_decoder`) this is `decode_loop.decode_lockstep`, a lean loop on the KV cache: each
    prompt is encoded once for its `num_samples` rows when `batch_size` is a multiple of `num_samples`,
    every token is drawn by `draw_tokens` with one uniform per row from a generator seeded with `seed`,
    and rows that end leave the batch. Other models (encoder-decoders, recurrent or multimodal ones, prompt-
    learning adapters) go through `model.generate` with `do_sample`, seeded inside a forked RNG state.
    `backend`: auto (that choice), loop (the lean loop; an error for a model it cannot drive) or hf (`generate`
    for every model; benchmarks/generation_speed.py compares the two). The two paths draw different samples
    for the same seed; each is reproducible.
    """
    _check_counts(num_samples, max_new_tokens, batch_size)
    if backend not in SAMPLE_IDS_BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(SAMPLE_IDS_BACKENDS)} (auto: the lean loop when it can drive "
            f"the model, else hf, transformers' generate), got {backend!r}"
        )
    config, warpers, eos = _settings(
        model, tokenizer, max_new_tokens, temperature, top_k=top_k, top_p=top_p, do_sample=True
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        decoder = loop_decoder(model) if backend != "hf" else None
        if decoder is None and backend == "loop":
            raise ValueError(
                f"backend='loop' cannot drive {type(model).__name__} (an encoder-decoder, a model that "
                "prepares its own generation inputs, or a forward without position ids or a KV cache); use "
                "'hf' or 'auto'"
            )
        if decoder is None:
            ids, logps = _sample_ids_with_generate(
                model,
                prompt_ids,
                num_samples=num_samples,
                config=config,
                warpers=warpers,
                eos=eos,
                seed=seed,
                batch_size=batch_size,
                device=device,
            )
        else:
            generator = loop_generator(seed, device) if temperature > 0 else None
            ids, logps = sample_ids_with_loop(
                [decoder],
                prompt_ids,
                num_samples=num_samples,
                choose=draw_from(warpers, generator),
                eos=eos,
                pad_id=config.pad_token_id,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                device=device,
            )
        return (ids, logps) if with_logps else ids
    finally:
        model.train(was_training)


def _sample_ids_with_generate(
    model, prompt_ids, *, num_samples, config, warpers, eos, seed, batch_size, device
) -> tuple[list[list[int]], list[list[float]]]:
    """`sample_ids` through `model.generate` (do_sample), for models the lean loop does not drive; the
    log-probs are the drawn tokens' under the scores generate sampled from (after the warpers)."""
    rows = [ids for ids in prompt_ids for _ in range(num_samples)]
    scored = copy.deepcopy(config)  # ... also returning the scores it sampled from
    scored.output_scores, scored.return_dict_in_generate = True, True
    out: list[list[int]] = []
    logps: list[list[float]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(sample_seed(seed, 0) % 2**63)
        for start in range(0, len(rows), batch_size):
            input_ids, attention_mask = left_pad(
                rows[start : start + batch_size], config.pad_token_id, device
            )
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=scored,
                logits_processor=LogitsProcessorList(warpers),
            )
            # A decoder-only model continues the prompt; an encoder-decoder writes a new sequence that
            # starts with its decoder start token.
            start_at = 1 if model.config.is_encoder_decoder else input_ids.shape[1]
            new = generated.sequences[:, start_at:]  # (B, new)
            scores = torch.stack(generated.scores, dim=1).float()  # (B, new, V), as sampled
            drawn = scores.log_softmax(-1).gather(-1, new[:, : scores.shape[1], None]).squeeze(-1)  # (B, new)
            for ids, lps in zip(new.tolist(), drawn.tolist()):
                ids = cut_at_eos(ids, eos)
                out.append(ids)
                logps.append(lps[: len(ids)])
    return out, logps


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    num_samples: int = 1,
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> list[Sample]:
    """Samples `num_samples` completions of every prompt with `model.generate`, in left-padded batches.

    Returns `len(prompts) * num_samples` samples, prompt-major: the samples of `prompts[i]` are
    `result[i * num_samples : (i + 1) * num_samples]`. Prompts (texts, chat templates already applied) are
    encoded by the one prompt encoder, `data.prompts.encode_prompt` (one BOS).

    - `temperature=0` decodes greedily (then `top_k`, `top_p` and `seed` play no part).
    - `top_k=None` and `top_p=None` mean no truncation: the full softmax is sampled. (Plain
      `model.generate` would silently apply top-k 50 when none is given.)
    - Nothing else reshapes the distribution: a repetition penalty, n-gram blocking or minimum length in
      the model's `generation_config` is not applied.
    - The `j`-th sample of the call (counting prompt-major) is drawn with its own generator seeded from
      `(seed, j)`, so results are reproducible and do not depend on `batch_size` or on what ran before
      (see the module docstring). Two models sampled with the same prompts and seed share the noise.

    The model is put in eval mode for sampling and given back in the mode it was in. The tokenizer
    must have a pad token (its id only fills positions the attention mask hides).
    """
    _check_counts(num_samples, max_new_tokens, batch_size)
    config, warpers, eos = _settings(model, tokenizer, max_new_tokens, temperature, top_k=top_k, top_p=top_p)
    pad_id = config.pad_token_id
    device = next(model.parameters()).device
    greedy = temperature == 0

    encoded = [encode_prompt(tokenizer, p) for p in prompts]  # one BOS, whatever the template writes
    jobs = [(p, ids) for p, ids in zip(prompts, encoded) for _ in range(num_samples)]

    was_training = model.training
    model.eval()
    try:
        samples: list[Sample] = []
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            input_ids, attention_mask = left_pad([ids for _, ids in batch], pad_id, device)
            processors = LogitsProcessorList(warpers)
            if not greedy:
                generators = [
                    torch.Generator(device=device).manual_seed(sample_seed(seed, start + i))
                    for i in range(len(batch))
                ]
                processors.append(_GumbelSampler(generators))
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
            )  # (B, T + new)
            new = out[:, input_ids.shape[1] :].tolist()
            for (prompt, prompt_ids), ids in zip(batch, new):
                completion_ids = cut_at_eos(ids, eos)
                text = tokenizer.decode(completion_ids, skip_special_tokens=True)
                samples.append(Sample(prompt, list(prompt_ids), completion_ids, text))
        return samples
    finally:
        model.train(was_training)
