"""The log-prob primitive: log-probs of completion tokens, without a [batch, time, vocab] float32 tensor.

Every objective in alignkit (SFT, DPO and its family, reward-free evaluation) consumes the output of
`completion_logps`. It runs the model's backbone once, keeps only the hidden states at positions whose
*next* token is a completion token, and projects them to the vocabulary a chunk at a time. Under autograd
each chunk is checkpointed, so the backward pass also rebuilds one chunk of logits at a time: peak memory
for the head is O(chunk_size x vocab) instead of O(batch x time x vocab).

What the logits go through first (a model family's scale and softcap, a sampler's top-k / top-p) is in
`alignkit.logprobs.transforms`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignkit.logprobs.transforms import LogitTransform, kept_tokens, logit_transform, truncation_warpers

DEFAULT_CHUNK_SIZE = 1024


@dataclass
class CompletionLogProbs:
    """Log-probs of the completion tokens of a batch.

    token_logps: (B, T) float32; entry [b, t] is log p(input_ids[b, t] | input_ids[b, :t]) where
        completion_mask[b, t] is 1, and 0 elsewhere.
    sum: (B,) float32, the per-sequence sum over completion tokens.
    count: (B,) int64, the number of completion tokens per sequence.
    token_entropy: (B, T) float32 entropy (nats) of the distribution that predicted each completion token,
        0 elsewhere; None unless asked for (`with_entropy=True`).
    """

    token_logps: torch.Tensor
    sum: torch.Tensor
    count: torch.Tensor
    token_entropy: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """(B,) per-token average log-prob (length-normalised)."""
        return self.sum / self.count.clamp(min=1)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors by name (what a wrapped module's forward returns: DDP and FSDP walk dicts)."""
        out = {"token_logps": self.token_logps, "sum": self.sum, "count": self.count}
        if self.token_entropy is not None:
            out["token_entropy"] = self.token_entropy
        return out


def token_logps_from_hidden(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    transform: LogitTransform | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target | hidden), entropy of p) for N rows, projecting to the vocabulary `chunk_size` rows
    at a time.

    hidden: (N, H), targets: (N,) int64, head: the output projection (H -> V), transform: what the
    model's forward applies to the head's output (`logit_transform`; None: nothing). p is softmax(logits / τ)
    with τ = `temperature`, renormalised over the kept set of `top_k` / `top_p` when given: the
    distribution a sampler at those settings drew from, so that the log-probs of sampled tokens are those
    of the policy that produced them. The kept set is recomputed from the scored logits themselves (no
    V-sized mask is stored): on-policy it is the sampler's, token for token. A target outside it (possible
    once the policy has moved) is scored over the kept set plus itself, so its log-prob stays finite (never
    below the untruncated one) and its gradient well defined; a -inf would make the ratio's and the KL's
    gradients nan. The entropy is that of the same renormalised distribution. Returns (N,) float32 log-probs
    and (N,) float32 entropies (None unless `with_entropy`). The logits of a chunk are upcast to float32
    (as a naive `log_softmax` in float32 would be) but never more than (chunk_size, V) of them exist at
    once, in the forward or the backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    truncation = truncation_warpers(top_k, top_p)

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()  # (C, V)
        if transform is not None:
            logits = transform(logits)
        if temperature != 1.0:
            logits = logits / temperature
        support = logits  # (C, V) the sampler's scores: -inf outside the kept set
        if truncation:
            kept = kept_tokens(logits, truncation).scatter_(-1, y.unsqueeze(-1), True)  # (C, V)
            support = logits.masked_fill(~kept, float("-inf"))
        normaliser = torch.logsumexp(support, dim=-1)  # (C,)
        logps = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - normaliser
        if not with_entropy:
            return logps.unsqueeze(-1)
        # H = log Z - sum_v p_v z_v, with p = softmax(z): no (C, V) log-prob tensor is kept (p is 0 off the
        # kept set, and z finite there, so no 0 * inf).
        entropy = normaliser - (torch.softmax(support, dim=-1) * logits).sum(-1)
        return torch.stack([logps, entropy], dim=-1)  # (C, 2)

    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            # Save only h; the chunk's logits are rebuilt in backward, one chunk at a time.
            out.append(checkpoint(chunk_logps, h, y, use_reentrant=False))
        else:
            out.append(chunk_logps(h, y))
    if not out:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    values = torch.cat(out)  # (N, 1) or (N, 2)
    return values[:, 0], (values[:, 1] if with_entropy else None)


def _split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, LogitTransform]:
    """(backbone, output head, logit transform) of a Hugging Face causal LM, looking through a peft wrapper.

    peft injects LoRA layers in place, so the base model's backbone runs the adapters too, and
    `disable_adapter()` on the wrapper still applies.
    """
    if hasattr(model, "module") and not hasattr(model, "get_base_model"):
        # A DDP / DeepSpeed wrapper: calling its inner modules here would skip the gradient all-reduce.
        raise TypeError(
            f"completion_logps got a {type(model).__name__} wrapper; run it inside the wrapped module's "
            "forward (alignkit.models.load.BatchForward) so that the wrapper's hooks run"
        )
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is inner:
        raise TypeError(
            f"{type(inner).__name__} is not a causal LM with a backbone and an output head; "
            "alignkit needs an AutoModelForCausalLM-style model"
        )
    config = getattr(inner, "config", None)
    return backbone, head, logit_transform(config) if config is not None else LogitTransform()


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    source_index: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    with_entropy: bool = False,
    model_inputs: Callable[[torch.nn.Module], dict] | None = None,
) -> CompletionLogProbs:
    """Per-token and per-sequence log-probs of the completion tokens of a batch under a causal LM.

    input_ids, completion_mask: (B, T). completion_mask[b, t] = 1 marks token t as a completion token
    to be scored (token 0 can never be scored: nothing predicts it).
    attention_mask: (B, T) padding mask, or a (B, 1, T, T) additive mask for rows that hold several
    sequences (a shared prompt with two completions, packed rows).
    position_ids: optional (B, T), for rows whose positions restart.
    source_index: optional (B, T); source_index[b, t] is the position whose hidden state predicts token
    t (default t - 1; differs where a row's sequences branch, e.g. after a shared prompt).
    temperature: score under softmax(logits / temperature), the distribution sampling at that
    temperature draws from (1 = the model's own); top_k / top_p: renormalised over the kept set, as a
    sampler truncating so draws (`token_logps_from_hidden`). with_entropy: also return each scored position's
    entropy (a diagnostic online RL logs). model_inputs: a function of the backbone returning more keyword
    inputs for it (a vision-language model's image features: `alignkit.models.vision.image_inputs`).
    Only positions predicting a completion token are projected to the vocabulary.

    Called on a model that accelerate prepared, this reaches past the DDP / FSDP wrapper: call it inside
    a wrapped module's forward (`alignkit.models.load.BatchForward`) so that the wrapper's hooks run.
    """
    backbone, head, transform = _split_causal_lm(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if model_inputs is not None:
        kwargs.update(model_inputs(backbone))
    hidden = backbone(**kwargs).last_hidden_state  # (B, T, H)
    return _logps_of_hidden(
        hidden,
        input_ids,
        completion_mask,
        head,
        transform=transform,
        chunk_size=chunk_size,
        source_index=source_index,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        with_entropy=with_entropy,
    )


def _completion_positions(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """((B, T) bool mask of the scored tokens, (N,) their rows, (N,) their columns), row-major; token 0
    is never scored (nothing predicts it)."""
    target_mask = completion_mask.bool().clone()
    target_mask[:, 0] = False
    rows, cols = target_mask.nonzero(as_tuple=True)
    return target_mask, rows, cols


@dataclass
class CompletionStates:
    """What predicts the completion tokens of a batch, before the projection to the vocabulary."""

    hidden: torch.Tensor
    """(N, H) hidden states of the positions that predict the N completion tokens (row-major)."""
    targets: torch.Tensor
    """(N,) the completion tokens they predict."""
    rows: torch.Tensor
    """(N,) the batch row of each."""
    head: torch.nn.Module
    """The output projection (H -> V)."""
    transform: LogitTransform
    """What the model's forward applies to the head's output (scale, softcap)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(C, V) float32 logits of (C, H) hidden states, transformed as the model's forward does."""
        return self.transform(self.head(hidden).float())


def completion_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> CompletionStates:
    """The hidden states that predict a batch's completion tokens (one backbone pass, no projection), for
    losses over the full next-token distribution (distillation: `alignkit.losses.distill`). The same
    positions, in the same order, as `completion_logps` scores. Call it inside a wrapped module's forward
    (`alignkit.models.load.BatchForward`), as `completion_logps`."""
    backbone, head, transform = _split_causal_lm(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    _, rows, cols = _completion_positions(completion_mask)
    return CompletionStates(hidden[rows, cols - 1], input_ids[rows, cols], rows, head, transform)


def _logps_of_hidden(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    head,
    *,
    transform: LogitTransform | None,
    chunk_size: int,
    source_index: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    with_entropy: bool = False,
) -> CompletionLogProbs:
    """`CompletionLogProbs` from the (B, T, H) hidden states of a sequence whose position t - 1 (or
    source_index[b, t]) predicts token t: only completion positions are projected by `head` (then
    `transform`)."""
    target_mask, rows, cols = _completion_positions(completion_mask)
    sources = cols - 1 if source_index is None else source_index[rows, cols]
    selected = hidden[rows, sources]  # (N, H)
    targets = input_ids[rows, cols]  # (N,)
    logps, entropy = token_logps_from_hidden(
        selected,
        targets,
        head,
        chunk_size,
        transform=transform,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        with_entropy=with_entropy,
    )  # (N,), (N,) or None

    B, T = input_ids.shape

    def scatter(values: torch.Tensor) -> torch.Tensor:  # (N,) -> (B, T), 0 off the completion tokens
        zeros = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
        return zeros.index_put((rows, cols), values)

    token_logps = scatter(logps)
    count = target_mask.sum(-1)
    return CompletionLogProbs(
        token_logps=token_logps,
        sum=token_logps.sum(-1),
        count=count,
        token_entropy=scatter(entropy) if entropy is not None else None,
    )


class _Seq2SeqHead(torch.nn.Module):
    """An encoder-decoder's output head as its forward applies it: T5 scales the decoder output by
    d_model^-0.5 first (when its config says so), BART-style models add `final_logits_bias` after."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        config = model.config
        scale = getattr(config, "scale_decoder_outputs", None)
        if scale is None:  # transformers 4: T5 scaled when the head was tied to the embedding
            scale = config.model_type in ("t5", "mt5", "umt5", "longt5") and config.tie_word_embeddings
        self.scale = config.d_model**-0.5 if scale else None
        self.head = model.get_output_embeddings()
        self.bias = getattr(model, "final_logits_bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            hidden = hidden * self.scale
        logits = self.head(hidden)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)


def encoder_decoder_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(B, T, H) decoder hidden states of an encoder-decoder model (T5, BART, ...; through a peft
    wrapper) for a batch with `encoder_input_ids` / `encoder_attention_mask` (the source) and
    `input_ids` / `attention_mask` (the decoder sequence, starting with the decoder start token)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder_mask = batch["encoder_attention_mask"]
    encoded = inner.get_encoder()(input_ids=batch["encoder_input_ids"], attention_mask=encoder_mask)
    return inner.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        encoder_hidden_states=encoded.last_hidden_state,
        encoder_attention_mask=encoder_mask,
        use_cache=False,
    ).last_hidden_state


def seq2seq_completion_logps(
    model: torch.nn.Module,
    batch: dict,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    with_entropy: bool = False,
) -> CompletionLogProbs:
    """`completion_logps` for an encoder-decoder model: log-probs of the decoder's completion tokens given
    the source. batch: `encoder_input_ids`, `encoder_attention_mask` (B, S); `input_ids`,
    `attention_mask`, `completion_mask` (B, T), the decoder sequence [start | completion | pad] with the
    completion marked. The decoder state at t - 1 predicts token t, as in a causal LM, and only completion
    positions are projected to the vocabulary."""
    if hasattr(model, "module") and not hasattr(model, "get_base_model"):
        raise TypeError(
            f"seq2seq_completion_logps got a {type(model).__name__} wrapper; run it inside the wrapped "
            "module's forward (alignkit.models.load.BatchForward)"
        )
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = encoder_decoder_states(model, batch)  # (B, T, H)
    return _logps_of_hidden(
        hidden,
        batch["input_ids"],
        batch["completion_mask"],
        _Seq2SeqHead(inner),
        transform=logit_transform(inner.config),  # T5Gemma: its decoder's softcap
        chunk_size=chunk_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        with_entropy=with_entropy,
    )


def sequence_logps(
    model: torch.nn.Module,
    batch: dict,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    with_entropy: bool = False,
) -> CompletionLogProbs:
    """Completion log-probs of a rollout batch under a causal LM (`input_ids` hold prompt and completion)
    or, when the batch has `encoder_input_ids`, an encoder-decoder (`seq2seq_completion_logps`), under the
    sampling distribution of `temperature`, `top_k`, `top_p`."""
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "with_entropy": with_entropy}
    if "encoder_input_ids" in batch:
        return seq2seq_completion_logps(model, batch, chunk_size=chunk_size, **settings)
    return completion_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        chunk_size=chunk_size,
        **settings,
    )


def token_logps(
    model,
    batch: dict,
    *,
    chunk_size: int,
    temperature: float,
    with_entropy: bool,
    top_k: int | None = None,
    top_p: float | None = None,
) -> dict:
    """{"token_logps": (B, T) log-probs of the completion tokens under softmax(logits / temperature),
    renormalised over the top_k / top_p kept set when given, and "token_entropy" (B, T) when asked}; the
    batch function the prepared policy runs (a causal or, for batches with `encoder_input_ids`, an
    encoder-decoder policy)."""
    out = sequence_logps(
        model,
        batch,
        chunk_size=chunk_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        with_entropy=with_entropy,
    )
    logps = {"token_logps": out.token_logps}
    if out.token_entropy is not None:
        logps["token_entropy"] = out.token_entropy
    return logps
