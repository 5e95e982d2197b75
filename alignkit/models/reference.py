"""The frozen reference model that KL-regularised objectives (DPO, KTO, listwise, and the online loops)
measure the policy against, in one of three modes (`reference.mode`):

- precomputed: the reference log-probs of every training and eval example are computed once, before
  training, sharded over the processes and gathered, cached on disk (keyed by the reference weights, the
  dtype and the examples' token ids), and stored on the examples as `ref_<name>` columns. No reference
  model is held during training.
- copy: a frozen copy of the reference weights, run on each batch without gradient.
- adapter: with LoRA, the policy's own base model with the adapter switched off.

A batch function `fn(model, batch) -> {name: (B,) or (B, K)}` (e.g. `dpo.pair_logps`) is what is
computed, for the reference exactly as for the policy; `Reference(batch)` returns it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.config.online import OnlineConfig
from alignkit.data.prepare import cache_dir
from alignkit.data.tokenize import fingerprint, source_fingerprint
from alignkit.io import atomic_path
from alignkit.logprobs.completion import token_logps
from alignkit.models.load import BatchForward, freeze, load_causal_lm


def model_fingerprint(name_or_path: str) -> str:
    """Identity of model weights: file sizes and times for a local folder, else the hub name."""
    path = Path(name_or_path)
    if path.is_dir():
        return fingerprint(
            [source_fingerprint(str(p)) for p in sorted(path.glob("*.safetensors"))], str(path)
        )
    return fingerprint(name_or_path)


@torch.no_grad()
def reference_logps(forward, examples: list[dict], collate, batch_size: int, *, accelerator) -> dict:
    """`forward(batch)` -> {name: (B,) or (B, K)} over every example, concatenated per name (float32, on
    the CPU), each example computed once over all processes: process r takes examples r, r+W, r+2W, ...,
    and the results are gathered, so every process returns all of them in order."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1 and len(examples) < world:
        world, rank = 1, 0  # too few to shard: every process computes them all
    shard = examples[rank::world]
    was_training = forward.training
    forward.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(shard), batch_size):
        batch = collate(shard[start : start + batch_size])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        for name, value in forward(batch).items():
            parts.setdefault(name, []).append(value.float())
    forward.train(was_training)
    local = {name: torch.cat(values) for name, values in parts.items()}
    if world == 1:
        return {name: value.cpu() for name, value in local.items()}
    per = math.ceil(len(examples) / world)  # rows per process, the last ones padded to it
    out = {}
    for name, value in local.items():
        padded = torch.cat([value, value.new_zeros(per - value.shape[0], *value.shape[1:])])
        gathered = accelerator.gather(padded).cpu()  # (W * per, ...): process r's rows at [r*per, ...)
        order = torch.tensor([(i % world) * per + i // world for i in range(len(examples))])
        out[name] = gathered[order]
    return out


def attach_precomputed_reference(
    cfg,
    forward,
    splits: dict[str, list[dict]],
    accelerator,
    *,
    collate,
    fields: tuple[str, ...],
    log=print,
) -> None:
    """Compute the reference log-probs of every split once (or load them from the cache) and store them on
    the examples, so no reference model is held during training.

    forward(batch) returns {name: (B,) or (B, K)}; each example gets e[f"ref_{name}"] (a float, or a list
    for (B, K)). The cache key is the reference weights, the dtype, the mixed precision and each example's `fields`.
    """
    for name, examples in splits.items():
        if not examples:
            continue
        key = fingerprint(
            model_fingerprint(cfg.reference.model or cfg.model),
            cfg.dtype,
            accelerator.mixed_precision,
            fields,
            [[e[f] for f in fields] for e in examples],
        )
        path = cache_dir(cfg) / f"reference-{name}-{key}.safetensors"
        # The main process decides, for all: processes that disagreed (no shared filesystem) would wait
        # for each other's gather forever.
        from accelerate.utils import broadcast_object_list

        cached = broadcast_object_list([path.exists()])[0] if accelerator.num_processes > 1 else path.exists()
        accelerator.wait_for_everyone()  # every process has looked before the main one writes
        if cached and not path.exists():
            raise ValueError(
                f"{path}: the main process found this reference cache and process "
                f"{accelerator.process_index} does not; put output_dir (or cache_dir) on a filesystem "
                "every process shares"
            )
        if cached:
            ref = load_file(str(path))
            log(f"reference log-probs for {name} loaded from {path}")
        else:
            ref = reference_logps(forward, examples, collate, cfg.batch_size * 2, accelerator=accelerator)
            if accelerator.is_main_process:
                with atomic_path(path) as tmp:  # (which also gives safetensors' 0600 file the umask's mode)
                    save_file(ref, str(tmp))
            log(f"reference log-probs for {len(examples)} {name} examples computed and cached in {path}")
        for column, values in ref.items():
            for e, v in zip(examples, values.tolist()):
                e[f"ref_{column}"] = v


class Reference:
    """A batch's reference log-probs, {name: tensor}, in the run's mode (see the module docstring).

    names: what `fn` returns that the objective needs from the reference (precomputed mode reads the
    batch's `ref_<name>` columns). copy: `frozen` is a BatchForward around the frozen copy. adapter: the
    prepared policy is called with its adapter switched off.
    """

    def __init__(
        self,
        mode: str,
        names: tuple[str, ...],
        frozen=None,
        unwrap: Callable = lambda m: m,
        *,
        autocast: Callable = contextlib.nullcontext,
    ):
        self.mode, self.names, self.frozen, self.unwrap = mode, names, frozen, unwrap
        self.autocast = autocast

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        if self.mode == "precomputed" or f"ref_{self.names[0]}" in batch:
            return {n: batch[f"ref_{n}"] for n in self.names if f"ref_{n}" in batch}
        # Under the run's autocast, as the policy's forward is (accelerate wraps the prepared model's), so
        # that the reference and the policy agree to the bit where their weights do.
        with torch.no_grad(), self.autocast():
            if self.mode == "copy":
                return self.frozen(batch)
            with adapter_disabled(self.unwrap(model)):
                return model(batch)


@contextlib.contextmanager
def adapter_disabled(module):
    """The LoRA adapter of the model inside `module` (a BatchForward, or the peft model) switched off."""
    inner = module.model if isinstance(module, BatchForward) else module
    # Re-enabling runs peft's set_adapter, which freezes every adapter but the active one (e.g. PPO's
    # critic adapter on the same base) and unfreezes all of the active one's layers (e.g. those in a VLM's
    # frozen vision tower): what trained before must train after, and nothing else.
    trainable = [p.requires_grad for p in inner.parameters()]
    try:
        if hasattr(inner, "disable_adapter"):  # a peft PeftModel
            with inner.disable_adapter():
                yield
        else:  # a diffusers model carrying a peft adapter (`add_adapter`), e.g. Diffusion-DPO's UNet
            inner.disable_adapters()
            try:
                yield
            finally:
                inner.enable_adapters()
    finally:
        for p, was in zip(inner.parameters(), trainable):
            p.requires_grad_(was)


def frozen_model(cfg, name_or_path: str, device) -> torch.nn.Module:
    """The reference weights, frozen, on `device`."""
    model = load_causal_lm(
        name_or_path,
        cfg.dtype,
        cfg.attn_implementation,
        cfg.trust_remote_code,
        encoder_decoder_ok=True,
        device=device,
    )
    return freeze(model)


def setup_reference(
    cfg, model, accelerator, fn: Callable, *, names: tuple[str, ...], precompute: Callable
) -> tuple[Reference, dict]:
    """The run's `Reference`, set up before training (and before LoRA is added to `model`).

    precomputed: calls `precompute(forward)` once with a BatchForward(fn) around `reference.model` when it
    names other weights than `model`, else around the policy itself (before training it is the
    reference: no second copy), and returns {"reference_time": seconds} as setup metrics. copy: a frozen
    copy. adapter: nothing to set up.
    """
    mode, setup_metrics, frozen = cfg.reference.mode, {}, None
    other = cfg.reference.model and cfg.reference.model != cfg.model
    if mode == "precomputed":
        ref_model = frozen_model(cfg, cfg.reference.model, accelerator.device) if other else model
        t0 = time.perf_counter()
        with accelerator.autocast():  # the policy's precision, so that both agree where their weights do
            precompute(BatchForward(ref_model, fn))
        setup_metrics = {"reference_time": time.perf_counter() - t0}
    elif mode == "copy":
        frozen = BatchForward(frozen_model(cfg, cfg.reference.model or cfg.model, accelerator.device), fn)
    reference = Reference(mode, names, frozen, accelerator.unwrap_model, autocast=accelerator.autocast)
    return reference, setup_metrics


def online_reference(cfg: OnlineConfig, model, accelerator, kl_weight: float, *, temperature: float):
    """(reference or None, reference_fn): the frozen reference of an online run, set up before LoRA wraps
    `model`, whose batch function `reference_fn` gives per-token log-probs at `temperature`, untruncated:
    the sampling temperature for the policy-gradient methods (with top_k / top_p the KL to it is
    KL(π_trunc ‖ π_ref,τ): the reference is a model, not a sampler), 1 for online DPO. No reference is held
    when `kl_weight` is 0."""

    def reference_fn(m, batch: dict) -> dict:
        return token_logps(
            m, batch, chunk_size=cfg.logprob_chunk_size, temperature=temperature, with_entropy=False
        )

    if kl_weight <= 0:
        return None, reference_fn
    reference, _ = setup_reference(
        cfg, model, accelerator, reference_fn, names=("token_logps",), precompute=None
    )
    return reference, reference_fn
