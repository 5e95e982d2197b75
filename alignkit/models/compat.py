"""Every shim for a transformers / peft / accelerate release difference, in one place: when a release we
support renames something, the rename is handled here and nowhere else; when support for the old release
is dropped, its branch goes.
"""

from __future__ import annotations

import warnings


def checkpointing_enabled(model) -> bool:
    """Whether `model` recomputes activations in backward (transformers 5 calls it
    `is_activation_checkpointing`, earlier releases `is_gradient_checkpointing`)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant), whatever the transformers release calls it."""
    # transformers 5 renamed the method and its argument; older releases only have the old names.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def get_peft_model(model, config):
    """peft's `get_peft_model`, without the FutureWarning peft raises by still asking transformers 5 for
    the deprecated `is_gradient_checkpointing` (nothing for a user to do)."""
    from peft import get_peft_model as wrap

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return wrap(model, config)


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide AcceleratorState (keeping the process group, PartialState), so the
    next Accelerator may use another mixed precision; releases without `_reset_state` have nothing to reset."""
    from accelerate.state import AcceleratorState

    if hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state(reset_partial_state=False)
