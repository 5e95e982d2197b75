"""Loading policy and reference models and tokenizers; LoRA; saving the final model."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token (the EOS or UNK token when it has none of its own)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no pad, EOS or UNK token to pad with; add one")
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    pad_token_id: int | None = None,
):
    """A causal LM from a hub name or local directory, safetensors weights only."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = pad_token_id
    if gradient_checkpointing:
        # transformers 5 renamed the method and its argument; older releases only have the old names.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def add_lora(model, lora) -> torch.nn.Module:
    """Wrap `model` with a trainable LoRA adapter (peft) from LoraSettings."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(model, name, False):
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def freeze(model) -> torch.nn.Module:
    """Put a model in eval mode with no trainable parameters (a reference or a scorer)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_model(model, tokenizer, path: str | Path, merge_lora: bool = False) -> Path:
    """save_pretrained as safetensors: full weights, or the LoRA adapter (merged into the base if asked)."""
    path = Path(path)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
