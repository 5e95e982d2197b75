"""LoRA adapters (peft): adding one to a policy, and running a module with only one adapter active."""

from __future__ import annotations

import contextlib

import torch

from alignkit.models.compat import checkpointing_enabled, get_peft_model


def add_lora(model, lora, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap `model` with a trainable LoRA adapter (peft) from LoraSettings.

    task_type SEQ_CLS (classifiers: reward and value models) also keeps the new head (`score` or
    `classifier`) fully trainable and saves it with the adapter.
    """
    from peft import LoraConfig

    targets = lora.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
    )
    if checkpointing_enabled(model):
        model.enable_input_require_grads()
    return get_peft_model(model, config)


@contextlib.contextmanager
def only_adapter(module: torch.nn.Module, name: str | None):
    """Run `module`'s LoRA layers with adapter `name` alone active (nothing changes for None).

    peft's own `set_adapter` also turns requires_grad off for every other adapter, which would freeze the
    policy's adapter while the critic runs; this switches only which adapter the layers apply, so both
    adapters train from one backward through the shared base."""
    if name is None:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer._active_adapter = active
