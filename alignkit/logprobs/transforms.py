"""What the output head's logits go through before they are the distribution alignkit scores.

A model family's logit transform (`logit_transform`: the scale and softcap its forward applies after the
head, read from its config) and a sampler's truncation (`truncation_warpers`: top-k, then top-p;
`kept_tokens`: the tokens they keep). `alignkit.logprobs.completion` applies both as it scores tokens, and
`alignkit.generation.sampling` samples through the same warpers, so the two agree on the distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to its output head's logits z before they are a distribution:
    softcap * tanh(scale * z / softcap), or scale * z without a softcap. The default is the identity."""

    scale: float = 1.0
    """Multiplies the logits (Granite: 1 / logits_scaling; Cohere: logit_scale; Falcon-H1: lm_head_multiplier)."""
    softcap: float | None = None
    """Caps them smoothly to (-softcap, softcap) after the scale (Gemma 2: final_logit_softcapping)."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (..., V) transformed logits, in the same dtype."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# Model types whose forward reads its logit transform from its text (or decoder) config, where a text model
# reads its own config. A composite model not listed applies none, whatever its text config holds, as
# transformers 5 does: Gemma 3's and Command A Vision's forwards ignore their text config's softcap / scale.
TRANSFORM_IN_TEXT_CONFIG = frozenset(
    {
        "aya_vision",
        "cohere_compass",
        "gemma3n",
        "gemma4",
        "gemma4_unified",
        "granite4_vision",
        "granite_docling",
        "hyperclovax_vision_v2",
        "inkling2",
        "inkling2_loop",
        "mistral_large4",
        "muse_glimmer",
        "muse_spark",
        "paligemma",
    }
)


# Model types that multiply the logits by `logits_scaling`; Granite (all its variants) divides by it, and
# MiniCPM3 divides the hidden states by it before a bias-free head, which is the same.
MULTIPLIES_BY_LOGITS_SCALING = frozenset({"hyperclovax", "hyperclovax_vision_v2"})


def logit_transform(config) -> LogitTransform:
    """The `LogitTransform` that a transformers model with this config applies after its output head,
    read from the fields its family uses (transformers 5.x): `logits_scaling` (Granite, MiniCPM3: divide;
    HyperCLOVA X: multiply), `logit_scale` (Cohere, Command R/A), `lm_head_multiplier` (Falcon-H1),
    `output_multiplier` (Muse), then a softcap, `final_logit_softcapping` (Gemma 2, PaliGemma 2, T5Gemma)
    or `logits_soft_cap` (RecurrentGemma). An encoder-decoder reads its decoder config (T5Gemma); a
    composite model its text config where it is in `TRANSFORM_IN_TEXT_CONFIG`. A family that does
    something else is caught by `check_logps_match_forward` when it loads."""
    model_type = getattr(config, "model_type", None)
    source = config
    if getattr(config, "is_encoder_decoder", False) or model_type in TRANSFORM_IN_TEXT_CONFIG:
        source = config.get_text_config(decoder=True)
    scale = 1.0
    if logits_scaling := getattr(source, "logits_scaling", None):
        scale = logits_scaling if model_type in MULTIPLIES_BY_LOGITS_SCALING else 1.0 / logits_scaling
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        if (value := getattr(source, name, None)) is not None:
            scale *= value
    softcap = getattr(source, "final_logit_softcapping", None) or getattr(source, "logits_soft_cap", None)
    return LogitTransform(float(scale), float(softcap) if softcap else None)


def truncation_warpers(top_k: int | None = None, top_p: float | None = None) -> list:
    """The logits processors that truncate a sampler's tempered scores: top-k, then top-p (transformers'
    own warpers, in the order `generate` applies them); none for top_k None / 0 and top_p None / 1.

    The one definition of the truncated distribution: `generation` samples through these, and
    `token_logps_from_hidden` recomputes the same kept sets from the logits it scores."""
    warpers = []
    if top_k is not None and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def kept_tokens(scores: torch.Tensor, warpers: list) -> torch.Tensor:
    """(C, V) bool: the tokens a sampler may draw from (C, V) tempered `scores` truncated by `warpers`
    (`truncation_warpers`); no gradient flows through the choice (the kept set is piecewise constant in the
    logits)."""
    with torch.no_grad():
        for warp in warpers:
            scores = warp(None, scores)
        return scores.isfinite()
