"""The lean decode loop: sampling on the KV cache of a standard decoder, one or several models stepping in
lockstep (`generation.guided` steps a policy and a guide together), each token drawn by inverting its CDF
with one uniform per row (`draw_tokens`). `generation.sampling.sample_ids` decodes through it whenever it can
drive the model (`loop_decoder`), and through transformers' `generate` otherwise; the seeding contract is
sampling.py's. The primitives both paths share live here too: each sample's seed (`sample_seed`), left
padding, and cutting a completion after its first EOS.
"""

from __future__ import annotations

import hashlib
import inspect

import torch


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for sample `index` of a call seeded `seed`.

    Hashing (rather than e.g. `seed * 2**32 + index`) matters: the CPU generator (mt19937) keeps only
    the low 32 bits of its seed, so arithmetic schemes make different seeds share streams.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads id lists into `(input_ids, attention_mask)`, both (B, T)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, T - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Keeps `ids` up to and including the first EOS; drops the padding generate adds after it."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


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
    ids = [cut_at_eos(row, eos_set) for row in tokens.tolist()]
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
        input_ids, attention_mask = left_pad(rows[start : start + batch_size // repeats], pad_id, device)
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
