"""The log-prob primitive: log-probs of completion tokens, without a [batch, time, vocab] float32 tensor.

Every objective in alignkit (SFT, DPO and its family, reward-free evaluation) consumes the output of
`completion_logps`. It runs the model's backbone once, keeps only the hidden states at positions whose
*next* token is a completion token, and projects them to the vocabulary a chunk at a time. Under autograd
each chunk is checkpointed, so the backward pass also rebuilds one chunk of logits at a time: peak memory
for the head is O(chunk_size x vocab) instead of O(batch x time x vocab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024


@dataclass
class CompletionLogProbs:
    """Log-probs of the completion tokens of a batch.

    token_logps: (B, T) float32; entry [b, t] is log p(input_ids[b, t] | input_ids[b, :t]) where
        completion_mask[b, t] is 1, and 0 elsewhere.
    sum: (B,) float32, the per-sequence sum over completion tokens.
    count: (B,) int64, the number of completion tokens per sequence.
    """

    token_logps: torch.Tensor
    sum: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """(B,) per-token average log-prob (length-normalised)."""
        return self.sum / self.count.clamp(min=1)


def token_logps_from_hidden(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """log p(target | hidden) for N rows, projecting to the vocabulary `chunk_size` rows at a time.

    hidden: (N, H), targets: (N,) int64, head: the output projection (H -> V).
    Returns (N,) float32. The logits of a chunk are upcast to float32 (as a naive `log_softmax` in float32
    would be) but never more than (chunk_size, V) of them exist at once, in the forward or the backward.
    """

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()  # (C, V)
        if logit_softcap:
            logits = torch.tanh(logits / logit_softcap) * logit_softcap
        return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            # Save only h; the chunk's logits are rebuilt in backward, one chunk at a time.
            out.append(checkpoint(chunk_logps, h, y, use_reentrant=False))
        else:
            out.append(chunk_logps(h, y))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def _split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """(backbone, output head, logit softcap) of a Hugging Face causal LM, looking through a peft wrapper.

    peft injects LoRA layers in place, so the base model's backbone runs the adapters too, and
    `disable_adapter()` on the wrapper still applies.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)  # DistributedDataParallel
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is inner:
        raise TypeError(
            f"{type(inner).__name__} is not a causal LM with a backbone and an output head; "
            "alignkit needs an AutoModelForCausalLM-style model"
        )
    config = getattr(inner, "config", None)
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        raise NotImplementedError(f"{type(inner).__name__} scales its logits; not supported yet")
    return backbone, head, getattr(config, "final_logit_softcapping", None)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    source_index: torch.Tensor | None = None,
) -> CompletionLogProbs:
    """Per-token and per-sequence log-probs of the completion tokens of a batch under a causal LM.

    input_ids, completion_mask: (B, T). completion_mask[b, t] = 1 marks token t as a completion token
    to be scored (token 0 can never be scored: nothing predicts it).
    attention_mask: (B, T) padding mask, or a (B, 1, T, T) additive mask for rows that hold several
    sequences (a shared prompt with two completions, packed rows).
    position_ids: optional (B, T), for rows whose positions restart.
    source_index: optional (B, T); source_index[b, t] is the position whose hidden state predicts token
    t (default t - 1; differs where a row's sequences branch, e.g. after a shared prompt).
    Only positions predicting a completion token are projected to the vocabulary.
    """
    backbone, head, softcap = _split_causal_lm(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    hidden = backbone(**kwargs).last_hidden_state  # (B, T, H)

    # The hidden state at t - 1 (or source_index[b, t]) predicts token t.
    target_mask = completion_mask.bool().clone()
    target_mask[:, 0] = False  # (B, T)
    rows, cols = target_mask.nonzero(as_tuple=True)  # N completion tokens
    sources = cols - 1 if source_index is None else source_index[rows, cols]
    selected = hidden[rows, sources]  # (N, H)
    targets = input_ids[rows, cols]  # (N,)
    logps = token_logps_from_hidden(selected, targets, head, chunk_size, softcap)  # (N,)

    B, T = input_ids.shape
    token_logps = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    token_logps = token_logps.index_put((rows, cols), logps)
    count = target_mask.sum(-1)
    return CompletionLogProbs(token_logps=token_logps, sum=token_logps.sum(-1), count=count)
