"""Offline RL from logged rewards: advantage-weighted fine-tuning (AWR) and filter-then-SFT (RAFT), with an
optional KL penalty to the reference.

    alignkit offline-rl model=PATH data=logged.jsonl output_dir=out method=awr

Rows are {prompt, response, reward} (alignkit.data.parse), e.g. a deployed model's responses scored by
`alignkit score`. Reads top to bottom: rows -> weights (or the RAFT filter), computed once over the
training rows (`alignkit.losses.weighted`) -> policy (and reference) -> weighted NLL -> fit -> save.

With kl_coef = β > 0 the loss adds β·KL(π ‖ π_ref) at every position of the logged responses, exact over
the full vocabulary (`alignkit.losses.distill` with β_JSD = 1, computed a chunk at a time), against the
frozen reference (reference.mode=copy, or adapter with LoRA). The logged responses were not sampled from
π, so a sampled-token estimate of the KL on them would be biased; the full-vocabulary KL at the states they
visit is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.base import ReferenceSettings
from alignkit.config.checks import check_reference_settings
from alignkit.config.load import ConfigError, validate
from alignkit.config.supervised import OfflineRLConfig
from alignkit.data.collate import collate_sft, completion_tokens
from alignkit.data.prepare import prepare_logged_data
from alignkit.logprobs.completion import completion_logps
from alignkit.losses.weighted import (
    advantages,
    awr_weights,
    effective_sample_size,
    raft_keep,
    weighted_nll,
)
from alignkit.models.load import BatchForward, load_policy, load_tokenizer
from alignkit.models.lora import add_lora
from alignkit.models.reference import frozen_model
from alignkit.models.teacher import base_model_teacher, completion_divergence, frozen_teacher
from alignkit.training.loop import fit
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import as_numbers

AWR_ONLY = ("baseline", "temperature", "max_weight")
RAFT_ONLY = ("top_fraction", "rank_within")


def check_offline_settings(cfg: OfflineRLConfig) -> None:
    """Refuse settings the chosen method would ignore, and a reference mode the KL penalty cannot use."""
    validate(cfg)
    unused = RAFT_ONLY if cfg.method == "awr" else AWR_ONLY
    changed = [k for k in unused if getattr(cfg, k) != getattr(OfflineRLConfig, k)]
    if changed:
        raise ConfigError(f"{', '.join(changed)} not used by method={cfg.method}; remove it")
    if cfg.kl_coef > 0:
        if cfg.reference.mode == "precomputed":
            raise ConfigError(
                "kl_coef > 0 needs the reference's full next-token distributions, which are not precomputed: "
                "use reference.mode=copy, or adapter with lora.enabled=true"
            )
        check_reference_settings(cfg)
    elif cfg.reference != ReferenceSettings(mode="copy"):
        raise ConfigError("reference is used by the KL penalty only: set kl_coef > 0 or remove it")


def row_weights(cfg: OfflineRLConfig, examples: list[dict]) -> tuple[list[dict], dict]:
    """(the training examples, each with its `weight`; RAFT keeps only its rows) and the statistics the
    run logs: effective sample size of the weights, their max, mean reward of all rows and of the rows
    trained on (weighted by w̃ for awr)."""
    rewards = torch.tensor([e["reward"] for e in examples], dtype=torch.float64)
    # By prompt text: a prompt's ids can end differently with each response (tokenize.py's boundary rule).
    groups = [e["prompt"] for e in examples]
    if cfg.method == "raft":
        scope = groups if cfg.rank_within == "prompt" else [0] * len(examples)
        kept = raft_keep(rewards.tolist(), scope, cfg.top_fraction)
        examples = [{**examples[i], "weight": 1.0} for i in kept]
        weights = torch.ones(len(kept), dtype=torch.float64)
        kept_reward = float(rewards[kept].mean())
    else:
        weights = awr_weights(advantages(rewards, groups, cfg.baseline), cfg.temperature, cfg.max_weight)
        examples = [{**e, "weight": float(w)} for e, w in zip(examples, weights)]
        kept_reward = float((weights * rewards).mean())
    stats = {
        "data/rows": float(len(examples)),
        "data/ess": effective_sample_size(weights),
        "data/ess_fraction": effective_sample_size(weights) / len(weights),
        "data/weight_max": float(weights.max()),
        "data/reward_mean": float(rewards.mean()),
        "data/reward_mean_trained": kept_reward,
    }
    return examples, stats


def collate_weighted(examples: list[dict], pad_id: int) -> dict:
    """Logged examples -> an SFT batch plus `weight` (B,) and `reward` (B,)."""
    batch = collate_sft(examples, pad_id)
    batch["weight"] = torch.tensor([e.get("weight", 1.0) for e in examples], dtype=torch.float32)
    batch["reward"] = torch.tensor([e["reward"] for e in examples], dtype=torch.float32)
    return batch


@dataclass
class WeightedObjective:
    """`loss_fn(model, batch)` for `fit`: `weighted_nll` of the prepared policy's log-prob sums (and KL
    sums); every metric is a mean over completion tokens, as the loss."""

    kl_coef: float

    def __call__(self, model, batch: dict):
        out = model(batch)
        kl = out.get("divergence")
        loss = weighted_nll(out["logps"], batch["weight"], out["tokens"], kl, kl_coef=self.kl_coef)
        n = out["tokens"].sum().clamp(min=1)
        metrics = {"loss": loss.detach(), "nll": -out["logps"].detach().sum() / n}
        if kl is not None:
            metrics["kl"] = kl.detach().sum() / n
        return loss, metrics


def train(cfg: OfflineRLConfig) -> Path:
    """Train a policy on logged rewarded responses; returns the folder of the saved final model."""
    check_offline_settings(cfg)
    accelerator, log, output_dir = start_run(cfg)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_logged_data(cfg, tokenizer, log)
    train_examples, stats = row_weights(cfg, train_examples)
    log(
        f"{cfg.method}: {len(train_examples)} rows trained on, effective sample size {stats['data/ess']:.1f} "
        f"({stats['data/ess_fraction']:.0%}), max weight {stats['data/weight_max']:.3g}, mean reward "
        f"{stats['data/reward_mean']:.4g} overall, {stats['data/reward_mean_trained']:.4g} as trained on"
    )

    model = load_policy(cfg, tokenizer.pad_token_id, accelerator.device)
    teacher = None
    if cfg.kl_coef > 0 and cfg.reference.mode == "copy":
        teacher = frozen_teacher(frozen_model(cfg, cfg.reference.model or cfg.model, accelerator.device))
    elif cfg.kl_coef > 0:
        teacher = base_model_teacher
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    model.train()

    def sums(m, batch: dict) -> dict:
        if teacher is not None:  # reverse KL(π ‖ π_ref): JSD(β = 1)
            return completion_divergence(
                m,
                batch,
                teacher,
                beta=1.0,
                temperature=1.0,
                chunk_size=cfg.logprob_chunk_size,
                with_logps=True,
            )
        out = completion_logps(
            m,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            chunk_size=cfg.logprob_chunk_size,
        )
        return {"logps": out.sum, "tokens": out.count.float()}

    def collate(examples: list[dict]) -> dict:
        return collate_weighted(examples, tokenizer.pad_token_id)

    def evaluate(prepared) -> dict:
        """Per-token NLL of the eval rows, and the gap in per-token log-prob between the rows whose reward
        is above the eval median and the rest (it grows as the policy favours high-reward responses)."""
        median = float(torch.tensor([e["reward"] for e in eval_examples]).median())
        totals = {
            k: torch.zeros((), dtype=torch.float64)
            for k in ("nll", "tokens", "high", "low", "n_high", "n_low")
        }
        for start in range(0, len(eval_examples), cfg.batch_size):
            batch = {
                k: v.to(accelerator.device)
                for k, v in collate(eval_examples[start : start + cfg.batch_size]).items()
            }
            out = prepared(batch)
            per_token = (out["logps"] / out["tokens"].clamp(min=1)).double().cpu()
            high = batch["reward"].cpu() > median
            totals["nll"] -= out["logps"].double().sum().cpu()
            totals["tokens"] += out["tokens"].double().sum().cpu()
            totals["high"] += per_token[high].sum()
            totals["low"] += per_token[~high].sum()
            totals["n_high"] += high.sum()
            totals["n_low"] += (~high).sum()
        t = as_numbers(totals)
        out = {"nll": t["nll"] / max(t["tokens"], 1.0)}
        if t["n_high"] and t["n_low"]:
            out["logp_gap"] = t["high"] / t["n_high"] - t["low"] / t["n_low"]
        return out

    prepared, _ = fit(
        cfg,
        accelerator,
        BatchForward(model, sums),
        train_examples,
        collate=collate,
        loss_fn=WeightedObjective(cfg.kl_coef),
        evaluate=evaluate if eval_examples else None,
        units=completion_tokens,
        setup_metrics=stats,
    )
    return save_final(accelerator, prepared, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
