"""Checks of settings that span several fields or sections, run before anything loads: the reference model's, and
those every online method shares.
"""

from __future__ import annotations

import dataclasses

from alignkit.config.alarms import check_alarm_settings
from alignkit.config.base import REFERENCE_MODES, TrainConfig
from alignkit.config.load import ConfigError
from alignkit.config.online import OnlineConfig


def check_reference_settings(cfg) -> None:
    """`reference.mode` is known, and `adapter` has an adapter to switch off."""
    mode = cfg.reference.mode
    if mode not in REFERENCE_MODES:
        raise ConfigError(f"reference.mode '{mode}' is not one of {', '.join(REFERENCE_MODES)}")
    if mode == "adapter" and not cfg.lora.enabled:
        raise ConfigError(
            "reference.mode=adapter needs lora.enabled=true (the reference is the base without it)"
        )
    if mode == "adapter" and cfg.reference.model not in (None, cfg.model):
        raise ConfigError(
            "reference.model is not used by reference.mode=adapter (the reference is the policy's base); "
            "remove it or use reference.mode=precomputed or copy"
        )


def check_online_settings(
    cfg: OnlineConfig, kl_weight: float, kl_name: str, *, kl_logged: bool = True
) -> None:
    """The checks every online method needs before anything loads: rewards given, the rollout cut into
    whole minibatches and micro-batches, clip ranges, alarm thresholds the run can use (a KL alarm needs the
    KL to the reference of every completion: `kl_logged`, and a reference), and a reference mode that applies
    online (when `kl_weight`, the setting `kl_name`, is > 0 a reference is held; at 0 none is, and a
    `reference.*` setting changed from its default would be ignored, so it is an error naming it)."""
    if not cfg.rewards and not getattr(cfg, "judge", None):  # (online DPO may rank with a judge instead)
        raise ConfigError("rewards is empty: give at least one reward source, e.g. 'rewards=[{type: vader}]'")
    if cfg.max_length != TrainConfig.max_length:
        raise ConfigError("max_length is not used online: completions are generation.max_new_tokens long")
    rollout = cfg.batch_size * cfg.num_generations
    minibatch = cfg.minibatch_size or rollout
    if rollout % minibatch or minibatch % cfg.grad_accum:
        raise ConfigError(
            f"minibatch_size={minibatch} must divide the rollout (batch_size x num_generations = {rollout}) "
            f"and be a multiple of grad_accum={cfg.grad_accum}"
        )
    judged = bool(getattr(cfg, "judge", None))  # online DPO's judge ranks alone
    no_kl = None if kl_weight > 0 else f"{kl_name}=0: no reference is held"
    check_alarm_settings(
        cfg.alarms,
        no_kl=no_kl if kl_logged else "this command takes no KL of every completion",
        groups=cfg.num_generations > 1,
        sources=1 if judged else len(cfg.rewards),
    )
    if kl_weight > 0:
        if cfg.reference.mode == "precomputed":
            raise ConfigError(
                "reference.mode=precomputed does not apply to online training (every rollout is new); "
                "use reference.mode=copy, or adapter with lora.enabled=true"
            )
        check_reference_settings(cfg)
        return
    default = type(cfg)().reference
    for f in dataclasses.fields(default):
        value = getattr(cfg.reference, f.name)
        if value != getattr(default, f.name):
            raise ConfigError(
                f"reference.{f.name}={value} has no effect with {kl_name}=0 (no KL term, no reference is "
                f"held); set {kl_name} > 0 or remove it"
            )
