"""generation.backend at run start: `auto` resolved to the backend that will sample, a backend the models
cannot use refused with the reason, before any weights load; the resolved value is what the run saves.

auto keeps the rule `sample_ids` has always had: the lean KV-cache loop where it can drive the model
(`decode_loop.loop_decoder`), else transformers' generate (hf). It is decided here from the checkpoint's
config and model class, built on the meta device (no weights read), so that the saved config and the
resume check (`training.checkpoint.run_fingerprint`) see the backend the run will use. vLLM is never picked
by auto: it is opted into.
"""

from __future__ import annotations

import dataclasses

import torch

from alignkit.config.load import ConfigError
from alignkit.generation.decode_loop import loop_decoder


def _meta_model(name_or_path: str, trust_remote_code: bool):
    """The model class `models.load.load_causal_lm` would load for a causal or vision-language checkpoint,
    built from its config on the meta device (no weights are read or allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    auto = (
        AutoModelForImageTextToText
        if getattr(config, "vision_config", None) is not None
        else AutoModelForCausalLM
    )
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def loop_refusal(name_or_path: str, trust_remote_code: bool = False) -> str | None:
    """Why the lean loop cannot drive the checkpoint `name_or_path` (a folder holding a LoRA adapter alone is
    its base model's), or None when it can."""
    from alignkit.models.load import adapter_base, is_encoder_decoder

    name_or_path = adapter_base(name_or_path) or name_or_path
    if is_encoder_decoder(name_or_path, trust_remote_code):
        return f"{name_or_path} is an encoder-decoder, which transformers' generate drives"
    model = _meta_model(name_or_path, trust_remote_code)
    if loop_decoder(model) is None:
        return (
            f"{name_or_path} ({type(model).__name__}) prepares its own generation inputs or has a forward "
            "without position ids or a KV cache, which transformers' generate handles"
        )
    return None


def vllm_refusal(
    name_or_path: str, trust_remote_code: bool = False, *, on_cpu: bool | None = None
) -> str | None:
    """Why vLLM cannot sample the checkpoint `name_or_path` for alignkit (a folder holding a LoRA adapter alone
        is its base model's), or None: `generation.vllm.vllm_refusal` on its config, `on_cpu` (default: no CUDA
        device here) deciding whether vLLM's CPU head sizes apply. A model it could serve without vLLM installed
    is an ImportError saying how to install it."""
    from transformers import AutoConfig

    from alignkit.generation.vllm import import_vllm
    from alignkit.generation.vllm import vllm_refusal as config_refusal
    from alignkit.models.load import adapter_base

    name_or_path = adapter_base(name_or_path) or name_or_path
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    on_cpu = not torch.cuda.is_available() if on_cpu is None else on_cpu
    why = config_refusal(config, on_cpu=on_cpu)
    if why is not None:
        return f"{name_or_path}: {why}"
    import_vllm()  # a model it could serve, and vLLM not installed: say how to install it, before any load
    return None


def resolve_backend(
    backend: str, models: list[str], *, trust_remote_code: bool = False, on_cpu: bool | None = None
) -> str:
    """generation.backend as the run will use it for every model in `models` (those it samples from): auto
    -> loop when the lean loop drives them all, else hf; loop, hf and vllm as given. ConfigError naming the
    model and the reason for loop or vllm on a model they cannot drive (`on_cpu`: see `vllm_refusal`)."""
    if backend == "vllm":
        for name in models:
            if (why := vllm_refusal(name, trust_remote_code, on_cpu=on_cpu)) is not None:
                raise ConfigError(f"generation.backend=vllm: {why}")
        return backend
    if backend not in ("auto", "loop"):
        return backend
    refusals = [why for name in models if (why := loop_refusal(name, trust_remote_code)) is not None]
    if backend == "loop" and refusals:
        raise ConfigError(f"generation.backend=loop cannot drive {refusals[0]}; use hf or auto")
    return "hf" if refusals else "loop"


def with_resolved_backend(cfg, models: dict[str, str] | None = None):
    """A copy of the config `cfg` with generation.backend resolved (`resolve_backend`) for the models it
    samples from, `models` {setting: hub name or folder} (default: {"model": cfg.model}); `cfg` is left as
    it is. Each model's folder is checked first (`models.load.check_model_source`), so that a missing one is
    named as such."""
    from alignkit.models.load import check_model_source

    models = models or {"model": cfg.model}
    for key, name in models.items():
        if not name:
            raise ConfigError(f"{key} is not set: give {key}=<hub name or local folder>")
        check_model_source(name, key)
    backend = resolve_backend(
        cfg.generation.backend,
        list(models.values()),
        trust_remote_code=getattr(cfg, "trust_remote_code", False),
    )
    return dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, backend=backend))
