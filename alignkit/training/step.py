"""The optimizer and its schedule, and one optimizer step of any algorithm: micro-batches (no gradient sync but
on the last) -> clip -> step -> schedule -> metrics reduced across processes once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch

from alignkit.config.base import TrainConfig
from alignkit.config.online import OnlineConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps: int, *, groups: list[dict] | None = None):
    """AdamW over the trainable parameters and a warm-up + linear/cosine/constant schedule.

    `groups` splits the parameters, each a dict of "params", "lr" and optionally "hold" (this many first
    optimizer steps at lr 0, e.g. PPO's policy while only its critic warms up); every group follows the one
    schedule from its own lr. Default: one group of every trainable parameter at cfg.lr."""
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    holds = [g.get("hold", 0) for g in groups]
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"]} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    warmup = int(cfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_scheduler == "constant":
            return 1.0
        raise ValueError(f"lr_scheduler '{cfg.lr_scheduler}' is not one of linear, cosine, constant")

    factor(0)  # validate the schedule name before training starts

    def held(hold: int):
        return lambda step: 0.0 if step < hold else factor(step)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [held(h) for h in holds])
    return optimizer, scheduler


def _as_tensor(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value), device=device)


def optimizer_step(
    accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    *,
    micro_batches: list[dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    units: list[float] | None = None,
    max_grad_norm: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One optimizer step over this process's micro-batches; returns the step's metrics.

    model: the prepared (accelerate-wrapped) model, which `loss_fn(model, batch)` must call so that the
    wrapper's hooks run; it returns the batch's loss, a mean over its `units`, and {name: value} metrics,
    each a mean over the same units. units[m] counts what micro-batch m's mean is over: rows for a
    sequence-mean loss (the default: 1 per micro-batch, i.e. equal weights), completion tokens for a
    token-mean one. Each loss is scaled by W·units[m] / (units of the whole step on all W processes), so
    that, with DDP averaging gradients over processes, the gradient is that of the mean over every unit of
    the step, however it is split into micro-batches and processes (OpenRLHF's and DAPO's aggregation).
    Gradients are synchronised on the last micro-batch only (`no_sync` before it).

    Returns 0-dim tensors: every metric as its unit-weighted mean over the step on all processes (one
    collective for all of them), `grad_norm` (before clipping) and `lr` (of the step just taken); the
    caller turns them into numbers once.
    """
    if len(micro_batches) > 1 and accelerator.distributed_type.name == "DEEPSPEED":
        raise ValueError(
            "under DeepSpeed, accelerate steps the optimizer after every backward: set grad_accum=1 "
            "(and DeepSpeed's gradient_accumulation_steps=1; docs/distributed.md)"
        )
    device = accelerator.device
    units = [1.0] * len(micro_batches) if units is None else [float(u) for u in units]
    local_units = torch.tensor(sum(units), dtype=torch.float64, device=device)
    step_units = (
        accelerator.reduce(local_units, "sum").item() if accelerator.num_processes > 1 else sum(units)
    )
    world = accelerator.num_processes
    sums: dict[str, torch.Tensor] = {}
    for m, (batch, n) in enumerate(zip(micro_batches, units)):
        last = m == len(micro_batches) - 1
        ctx = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with ctx, accelerator.autocast():
            loss, metrics = loss_fn(model, batch)
            accelerator.backward(loss * (world * n / max(step_units, 1e-12)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + _as_tensor(v, device) * n
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        grads = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
        grad_norm = torch.stack(grads).sum().sqrt() if grads else torch.zeros((), device=device)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    names = list(sums)
    totals = torch.stack([sums[k].to(device) for k in names]) if names else torch.zeros(0, device=device)
    if world > 1:
        totals = accelerator.reduce(totals, "sum")
    means = totals / max(step_units, 1e-12)
    out = {k: means[i] for i, k in enumerate(names)}
    out["grad_norm"] = torch.as_tensor(grad_norm).detach().float().reshape(())
    out["lr"] = torch.tensor(lr)
    return out


def as_numbers(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors -> floats, in one device-to-host copy."""
    names = list(metrics)
    if not names:
        return {}
    values = torch.stack([torch.as_tensor(metrics[k]).float().cpu().reshape(()) for k in names]).tolist()
    return dict(zip(names, values))


def evaluate_in_batches(
    model, examples: list[dict], batch_size: int, collate: Callable, *, loss_fn: Callable, device
) -> dict:
    """Every metric of `loss_fn(model, batch)` over `examples`, in batches, each batch weighted by its rows."""
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        _, metrics = loss_fn(model, batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + _as_tensor(v, device) * len(chunk)
    return {k: v / len(examples) for k, v in as_numbers(totals).items()}


def default_lr(num_parameters: int, lora: bool = False) -> float:
    """The learning rate `lr=none` resolves to: 1e-6 x sqrt(7e9 / num_parameters), x10 for a LoRA adapter.

    One constant cannot serve every online method's models: GRPO recipes for 7B policies use 1e-6 (DeepSeekMath, Dr. GRPO,
    TRL's default), GPT-2-sized PPO ~1e-5 (TRL's sentiment example: 1.41e-5), and the shipped 656K-parameter
    model barely moves at 1e-5 in an epoch (+0.02 reward) but learns at 1e-4. An inverse square root of the
    size through the 7B anchor gives 2.6e-6 at 1B, 7.5e-6 at 124M and 1.03e-4 at 656K. LoRA's best rate is
    about 10x full fine-tuning's (Schulman et al. 2025, "LoRA Without Regret"), hence the factor.
    """
    return 1e-6 * (7e9 / num_parameters) ** 0.5 * (10.0 if lora else 1.0)


def with_default_lr(cfg: OnlineConfig, model, log=print) -> OnlineConfig:
    """`cfg` with `lr=none` resolved by `default_lr` from the loaded policy's size (logged), else as is."""
    if cfg.lr is not None:
        return cfg
    cfg = dataclasses.replace(
        cfg, lr=default_lr(sum(p.numel() for p in model.parameters()), cfg.lora.enabled)
    )
    log(f"lr {cfg.lr:.3g} (scaled to the policy's size; set lr= to choose one)")
    return cfg
