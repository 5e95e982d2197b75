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
import hashlib
import inspect
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper

from alignkit.data.prompts import encode_prompt
from alignkit.logprobs.transforms import truncation_warpers

SAMPLE_IDS_BACKENDS = ("auto", "loop", "hf")
"""The backends `sample_ids` draws with (generation.backend's others, vllm, sample elsewhere)."""


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for sample `index` of a call seeded `seed`.

    Hashing (rather than e.g. `seed * 2**32 + index`) matters: the CPU generator (mt19937) keeps only
    the low 32 bits of its seed, so arithmetic schemes make different seeds share streams.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


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


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads id lists into `(input_ids, attention_mask)`, both (B, T)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, T - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Keeps `ids` up to and including the first EOS; drops the padding generate adds after it."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


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


def draw_tokens(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from `softmax(scores)` by inversion of its CDF: (B, V) scores (already tempered and
    truncated; -inf = never drawn) and (B,) uniforms in [0, 1) -> (B,) token ids.

    Token i is drawn when `cdf[i-1] <= u * cdf[V-1] < cdf[i]` (searchsorted with right=True), an interval of
    width p_i, so a token with p_i = 0 (a flat step of the CDF) is never drawn. The CDF is summed in
    float64, so the frequencies are exact to ~1e-16 plus the resolution of the uniforms (2^-24 for float32,
    2^-53 for float64). One uniform per row instead of V Gumbel or exponential variates: on CPU this draw
    costs a tenth of `torch.multinomial` on a (64, 2048) batch.
    """
    cdf = scores.float().softmax(-1).double().cumsum(-1)  # (B, V), non-decreasing
    total = cdf[:, -1:].contiguous()  # (B, 1), 1 up to rounding
    ids = torch.searchsorted(cdf, uniforms.double().unsqueeze(-1) * total, right=True)  # (B, 1)
    # u * total can round up to total; the first index where the CDF reaches total is the last token
    # with positive probability, never a zero-probability one after it.
    return torch.minimum(ids, torch.searchsorted(cdf, total, right=False)).squeeze(-1)


def _cache_keyword(model) -> str | None:
    """The keyword `model.forward` takes its KV cache by ("cache" from transformers 5.x, "past_key_values"
    before), or None when the lean decode loop cannot drive this model and `generate` must: an
    encoder-decoder, a model whose class prepares its own generation inputs (recurrent state,
    multimodal position ids, ...), or a forward without position ids or attention mask."""
    if getattr(model.config, "is_encoder_decoder", False):
        return None
    from transformers import GenerationMixin

    own = getattr(type(model), "prepare_inputs_for_generation", None)
    if own is not GenerationMixin.prepare_inputs_for_generation:
        return None
    params = inspect.signature(model.forward).parameters
    if not {"input_ids", "attention_mask", "position_ids", "use_cache"} <= params.keys():
        return None
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def loop_decoder(model):
    """(module to call, its cache keyword) for the lean decode loop, or None (use `generate`). A LoRA
    PeftModel is decoded through its base model, whose layers carry the adapters; prompt-learning
    adapters (prefix tuning, ...) change the inputs and are left to `generate`. What generation.backend=auto
    resolves by (`generation.resolve`)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        if getattr(model.active_peft_config, "is_prompt_learning", False):
            return None
        model = model.get_base_model()
    key = _cache_keyword(model)
    return None if key is None else (model, key)


def loop_generator(seed: int, device) -> torch.Generator:
    """The one generator the lean loop draws every token's uniform from in a call seeded `seed`."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, 0) % 2**63)


def draw_from(warpers: list, generator: torch.Generator | None):
    """The lean loop's `choose` for one model: its warped scores (`sampling_warpers`), one token per row drawn
    by `draw_tokens` with one uniform from `generator` (the argmax when None), and the drawn token's log-prob
    under those scores."""

    def choose(logits: list[torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits[0].float()  # (b, V)
        for warp in warpers:
            scores = warp(None, scores)
        if generator is None:
            new = scores.argmax(-1)  # (b,)
        else:
            u = torch.rand(len(rows), generator=generator, device=scores.device, dtype=torch.float64)
            new = draw_tokens(scores, u)
        return new, scores.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)

    return choose


def decode_lockstep(
    decoders: list[tuple],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    choose,
    eos: torch.Tensor,
    pad_id: int,
    repeats: int = 1,
    first_row: int = 0,
) -> tuple[list[list[int]], list[list[float]]]:
    """The lean decode loop: one forward per new token and model, each model on its own KV cache, rows cut
    after their first EOS.

    decoders: `loop_decoder(model)`'s (module, cache keyword) of every model that steps (one for plain
    sampling; the policy and a guide for a guided rollout: `generation.guided`), all sharing the tokenizer.
    input_ids, attention_mask: (P, T), left-padded. With `repeats` > 1 the P prompts are encoded once and
    their caches repeated so that rows [i * repeats, (i + 1) * repeats) continue prompt i. Position ids count
    real tokens only (`cumsum(mask) - 1`, as `generate` makes them), so left padding changes nothing. Each step
    `choose(logits, rows)` picks every live row's token from the models' last logits ([(b, V_m)] in
    `decoders`' order; `rows`: (b,) the index of each batch row's completion in the call, counting from
    `first_row`) and returns (b,) tokens and their
    (b,) log-probs under the distribution they were drawn from (`draw_from`). A row that emits an EOS id stops:
    it leaves the batch (and every cache) at the next step, and the loop ends when no row is live. Returns
    (P * repeats) id lists and, for each, the log-probs of its tokens.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (P, T)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    caches = [_new_cache(module) for module, _ in decoders]  # filled in place by every forward

    def forward(inputs: dict, first: bool = False) -> list[torch.Tensor]:
        out = []
        for (module, key), cache in zip(decoders, caches):
            keep = {"logits_to_keep": 1} if first and _keeps_logits(module) else {}
            out.append(module(**inputs, **keep, use_cache=True, **{key: cache}).logits[:, -1])  # (b, V_m)
        return out

    logits = forward(inputs, first=True)  # [(P, V_m)]
    B = input_ids.shape[0] * repeats
    mask, last = attention_mask, position_ids[:, -1:]  # (P, T), (P, 1)
    if repeats > 1:
        for cache in caches:
            cache.batch_repeat_interleave(repeats)
        logits = [x.repeat_interleave(repeats, dim=0) for x in logits]
        mask, last = (x.repeat_interleave(repeats, dim=0) for x in (mask, last))
    live = torch.arange(B, device=input_ids.device)  # original row of each batch row
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=input_ids.device)
    for t in range(max_new_tokens):
        new, logps[live, t] = choose(logits, live + first_row)  # (b,), (b,)
        tokens[live, t] = new
        ended = torch.isin(new, eos)  # (b,)
        if t == max_new_tokens - 1:
            break
        if ended.any():  # one host sync per step, as generate's stopping check
            keep = (~ended).nonzero().squeeze(-1)
            if len(keep) == 0:
                break
            for cache in caches:
                cache.batch_select_indices(keep)
            live, new, mask, last = live[keep], new[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)  # (b, T + t + 1)
        last = last + 1
        logits = forward({"input_ids": new.unsqueeze(-1), "attention_mask": mask, "position_ids": last})
    eos_set = set(eos.tolist())
    ids = [_cut_at_eos(row, eos_set) for row in tokens.tolist()]
    return ids, [lp[: len(row)] for row, lp in zip(ids, logps.tolist())]


def _new_cache(model):
    """An empty DynamicCache laid out for `model` (sliding-window layers where its config has them; older
    transformers take no config). Passing one in, rather than letting the forward make its own, gives
    the same object back on every version (transformers 4.x returns a legacy tuple otherwise)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _keeps_logits(model) -> bool:
    """Whether `model.forward` can compute the logits of the last position only (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


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

    For a standard decoder (see `_cache_keyword`) this is `decode_lockstep`, a lean loop on the KV cache: each
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


def sample_ids_with_loop(
    decoders: list[tuple],
    prompt_ids: list[list[int]],
    *,
    num_samples: int,
    choose,
    eos: set[int],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int,
    device,
) -> tuple[list[list[int]], list[list[float]]]:
    """`sample_ids` through the lean KV-cache loop (`decode_lockstep`) on `decoders` (`loop_decoder`'s (module,
    cache keyword) of each model that steps), `choose` picking every token (`draw_from`: one model's warped
    scores and one generator, seeded by `loop_generator`, for the whole call)."""
    eos_tensor = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    # Share each prompt's encoding among its samples when a batch holds whole groups.
    repeats = num_samples if batch_size % num_samples == 0 else 1
    rows = prompt_ids if repeats > 1 else [ids for ids in prompt_ids for _ in range(num_samples)]
    out: list[list[int]] = []
    logps: list[list[float]] = []
    for start in range(0, len(rows), batch_size // repeats):
        input_ids, attention_mask = _left_pad(rows[start : start + batch_size // repeats], pad_id, device)
        ids, lps = decode_lockstep(
            decoders,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            choose=choose,
            eos=eos_tensor,
            pad_id=pad_id,
            repeats=repeats,
            first_row=len(out),
        )
        out, logps = out + ids, logps + lps
    return out, logps


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
            input_ids, attention_mask = _left_pad(
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
                ids = _cut_at_eos(ids, eos)
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
            input_ids, attention_mask = _left_pad([ids for _, ids in batch], pad_id, device)
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
                completion_ids = _cut_at_eos(ids, eos)
                text = tokenizer.decode(completion_ids, skip_special_tokens=True)
                samples.append(Sample(prompt, list(prompt_ids), completion_ids, text))
        return samples
    finally:
        model.train(was_training)
