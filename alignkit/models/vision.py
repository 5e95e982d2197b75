"""Vision-language models in `alignkit dpo`: telling them apart, freezing the vision side, and encoding each
pair's images once.

A VLM (LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration, ...) is a causal LM whose backbone
also takes image inputs: `logprobs.completion.completion_logps` runs it as it runs a text model, with the
keyword inputs `image_inputs` builds. A pair's chosen and rejected responses show the same images, so in either batch
layout (`data.vision_rows.collate_vision_shared_prompt`: one [prompt | chosen | rejected] row per pair;
`collate_vision_pairs`: one row per sequence) the vision tower runs once per pair and its features go to
the backbone as precomputed `mm_encoder_outputs`, never encoded twice.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

# Submodules that make up a VLM's vision side (tower, projector), by their attribute names in transformers.
VISION_MODULES = (
    "vision_tower",
    "multi_modal_projector",
    "visual",
    "vision_model",
    "image_newline",
    "mm_projector",
)
# Per-image inputs an image processor returns, passed to the backbone's get_image_features.
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
# Multimodal-RoPE models whose positions `mrope_positions` builds for share_prompt's one row per pair (their
# backbone's get_rope_index(input_ids, mm_token_type_ids, image_grid_thw) is Qwen2-VL's).
ONE_ROW_MROPE = ("qwen2_vl",)


def is_vision_language(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint is a vision-language model (its config has a `vision_config`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return getattr(config, "vision_config", None) is not None


def vision_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter in the vision tower and the projector (LoRA layers there too)."""
    return [
        (n, p) for n, p in model.named_parameters() if any(part in VISION_MODULES for part in n.split("."))
    ]


def freeze_vision(model: torch.nn.Module) -> int:
    """Stop gradients to the vision tower and the projector; returns how many parameters were frozen."""
    params = vision_parameters(model)
    if not params:
        raise TypeError(
            f"{type(model).__name__}: found no vision tower or projector (looked for {', '.join(VISION_MODULES)})"
            "; set freeze_vision=false"
        )
    for _, p in params:
        p.requires_grad_(False)
    return sum(p.numel() for _, p in params)


def image_inputs(backbone: torch.nn.Module, batch: dict) -> dict:
    """Keyword inputs for a VLM backbone's forward on a `collate_vision_pairs` batch: the batch's images
    encoded once (`get_image_features`) and their features repeated in the rows' order (`image_order`), as
    `mm_encoder_outputs`; Qwen2-VL's `image_grid_thw` in the rows' order (its M-RoPE positions need one per
    placeholder run); the per-token type columns. {} for a batch without images (text rows)."""
    extra = {k: batch[k] for k in PER_TOKEN_KEYS if k in batch}
    if "pixel_values" not in batch:
        return extra
    if "mm_encoder_outputs" not in inspect.signature(backbone.forward).parameters:
        raise TypeError(
            f"{type(backbone).__name__}.forward takes no precomputed image features (mm_encoder_outputs), which "
            "alignkit hands it so that each pair's images are encoded once; upgrade transformers (5.24 has it)"
        )
    encoder_inputs = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    trainable = any(p.requires_grad for _, p in vision_parameters(backbone))
    with contextlib.nullcontext() if trainable else torch.no_grad():
        encoded = backbone.get_image_features(**encoder_inputs, return_dict=True)
    order = batch["image_order"]
    features = encoded.pooler_output  # per encoded image: a list of (tokens_i, H), or one (N, tokens, H)
    if isinstance(features, torch.Tensor):
        encoded.pooler_output = features[order.to(features.device)]
    else:
        encoded.pooler_output = [features[i] for i in order.tolist()]
    extra["mm_encoder_outputs"] = {"image": encoded}
    if "image_grid_thw" in batch:
        extra["image_grid_thw"] = batch["image_grid_thw"][order]
    if "prompt_spans" in batch and hasattr(backbone, "get_rope_index"):
        extra["position_ids"] = mrope_positions(backbone, batch)
    return extra


def mrope_positions(backbone: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(3, R, T) multimodal-RoPE position ids for a `collate_vision_shared_prompt` batch: each prompt's as the
    model computes them for the prompt alone (`get_rope_index`: image tokens on their grid), and its chosen
    and rejected blocks both continuing from the prompt's largest position + 1 (text tokens have one position,
    repeated over the three axes), as each would alone after the prompt."""
    flat = batch[
        "position_ids"
    ]  # (R, T): each segment's chosen and rejected blocks start at its prompt length
    positions = flat[None].repeat(3, 1, 1)  # (3, R, T)
    first_image = 0
    for row, offset, P, n_images in batch["prompt_spans"].tolist():
        grids = batch["image_grid_thw"][first_image : first_image + n_images]
        first_image += n_images
        prompt = slice(offset, offset + P)
        types = batch["mm_token_type_ids"][row : row + 1, prompt]
        rope, _ = backbone.get_rope_index(
            batch["input_ids"][row : row + 1, prompt], types, grids if n_images else None
        )
        positions[:, row, prompt] = rope[:, 0]
        # The pair's chosen and rejected blocks: flat positions P, P+1, ... become max + 1, max + 2, ...
        block = batch["segment"][row] == batch["segment"][row, offset + P]
        positions[:, row, block] += int(rope.max()) + 1 - P
    return positions


@dataclass
class VisionRun:
    """What `alignkit dpo` does differently for a vision-language model: the processor, how examples are
    prepared (`prepare(cfg, tokenizer, log)`, as `prepare_preference_data`), and the batch layout
    (`layout(examples, pad_id)`, as `collate_pairs`)."""

    processor: object
    prepare: Callable
    layout: Callable


def check_vision_settings(cfg, spec) -> bool:
    """Whether `cfg.model` is a vision-language model; the VLM-only settings (freeze_vision=false, mdpo*)
    are errors on a text model, as are mdpo with a reference-free loss and mdpo_* without mdpo."""
    from alignkit.config.load import ConfigError
    from alignkit.config.preference import DPOConfig

    defaults = DPOConfig()
    if not is_vision_language(cfg.model, cfg.trust_remote_code):
        for name in ("freeze_vision", "mdpo", "mdpo_corruption", "mdpo_keep"):
            if getattr(cfg, name) != getattr(defaults, name):
                raise ConfigError(
                    f"{name}={getattr(cfg, name)!r} is for vision-language models, and {cfg.model} is a text "
                    "model (its config has no vision_config); remove the setting"
                )
        return False
    if cfg.mdpo and not spec.needs_reference:
        raise ConfigError(
            f"mdpo=true compares log-ratios to the reference, and loss '{cfg.loss}' has none; use a loss with "
            "a reference (e.g. sigmoid)"
        )
    for name in ("mdpo_corruption", "mdpo_keep"):
        if not cfg.mdpo and getattr(cfg, name) != getattr(defaults, name):
            raise ConfigError(f"{name} is used by mdpo=true only; set mdpo=true or remove it")
    return True


def vision_setup(cfg, log=print) -> VisionRun:
    """The `VisionRun` of a vision-language model (`check_vision_settings` said it is one): its processor,
    and share_prompt's one-row layout unless mdpo, a multimodal RoPE other than Qwen2-VL's, or a mask built
    from token_type_ids (Gemma 3, PaliGemma) needs one row per sequence."""
    from alignkit.data.vision_rows import (
        Corruption,
        collate_vision_pairs,
        collate_vision_shared_prompt,
        load_processor,
        prepare_vision_data,
    )

    processor = load_processor(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    why_two_rows = None
    if cfg.mdpo:
        why_two_rows = "mdpo adds rows of the chosen response under corrupted images"
    elif uses_mrope(cfg.model, cfg.trust_remote_code) and model_type(cfg) not in ONE_ROW_MROPE:
        why_two_rows = "alignkit places multimodal RoPE positions in one row for Qwen2-VL only"
    elif "token_type_ids" in processor.model_input_names:
        # Gemma-style: the model builds its own mask from token_type_ids (image tokens attending both ways,
        # sliding windows), which share_prompt's 4D mask would replace.
        why_two_rows = "the model builds its attention mask from token_type_ids"
    if cfg.share_prompt and why_two_rows is None:
        layout = partial(collate_vision_shared_prompt, processor=processor)
        log(
            "vision-language model, share_prompt: one [prompt | chosen | rejected] row per pair, images encoded once"
        )
    else:
        corruption = Corruption(cfg.mdpo_corruption, cfg.mdpo_keep, cfg.seed) if cfg.mdpo else None
        layout = partial(collate_vision_pairs, processor=processor, corruption=corruption)
        mdpo = (
            f"; mDPO with {cfg.mdpo_corruption}-corrupted images (keep <= {cfg.mdpo_keep})"
            if cfg.mdpo
            else ""
        )
        log(
            "vision-language model: one row per sequence, each pair's images encoded once for its chosen and "
            "rejected rows"
            + (f" (not share_prompt's one row per pair: {why_two_rows})" if cfg.share_prompt else "")
            + mdpo
        )
    return VisionRun(
        processor, lambda c, _tokenizer, log=print: prepare_vision_data(c, processor, log), layout
    )


def model_type(cfg) -> str:
    """The `model_type` of cfg.model's config (llava, qwen2_vl, ...)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code).model_type


def uses_mrope(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model places tokens with multimodal RoPE (Qwen2-VL and its successors: three position
    ids per token, computed from the image grid); share_prompt's one row per pair then needs
    `mrope_positions`, written for the families in ONE_ROW_MROPE."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return "mrope" in json.dumps(config.to_dict(), default=str)
