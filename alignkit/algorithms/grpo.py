"""Online RL without a critic: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO (Ahmadian et al.
2024) and REINFORCE++ (Hu 2025), one loop with the advantage estimator as a setting.

    alignkit grpo model=PATH data=prompts.jsonl 'rewards=[{type: vader}]'
    alignkit grpo ... advantage=rloo          # or: alignkit rloo ...

Reads top to bottom: prompts -> policy (+ reference) -> for each step: rollout (sample G completions of
each prompt, score them, log-probs of the sampling policy and the reference) -> group advantages ->
`ppo_epochs` x minibatches of the shared optimizer step on the clipped surrogate + β·KL -> metrics ->
checkpoint. The maths is in alignkit.losses.policy; the rollout in alignkit.rollout; the optimizer step
and checkpoints are the offline trainers' own (alignkit.runtime, alignkit.checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.checkpoint import Checkpointer
from alignkit.config import ConfigError, GRPOConfig, TrainConfig
from alignkit.data.prepare import _split_eval
from alignkit.data.prompts import load_prompt_rows
from alignkit.logprobs import completion_logps
from alignkit.losses.policy import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    aggregation_units,
    clipped_surrogate,
    compute_advantages,
    frac_reward_zero_std,
    get_advantage,
    kl_estimate,
)
from alignkit.models import BatchForward, add_lora, disable_dropout, load_policy, load_tokenizer
from alignkit.reference import Reference, check_reference_settings, setup_reference
from alignkit.rewards import RewardSet
from alignkit.rollout import Rollout, SamplingSettings, collect, token_logps_in_batches
from alignkit.runtime import (
    DataOrder,
    MetricsLogger,
    as_numbers,
    make_optimizer,
    optimizer_step,
    save_final,
    start_run,
    total_steps,
)


def check_settings(cfg: GRPOConfig) -> str:
    """Validate the online settings before anything loads; returns the loss aggregation to use."""
    spec = get_advantage(cfg.advantage)
    if not cfg.rewards:
        raise ConfigError("rewards is empty: give at least one reward source, e.g. 'rewards=[{type: vader}]'")
    if cfg.num_generations < spec.min_group_size:
        raise ConfigError(
            f"num_generations={cfg.num_generations}: advantage '{cfg.advantage}' needs at least "
            f"{spec.min_group_size} completions per prompt"
        )
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(f"kl_estimator '{cfg.kl_estimator}' is not one of {', '.join(KL_ESTIMATORS)}")
    aggregation = spec.default_aggregation if cfg.loss_aggregation == "auto" else cfg.loss_aggregation
    if aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"loss_aggregation '{cfg.loss_aggregation}' is not auto or one of {', '.join(AGGREGATIONS)}"
        )
    if cfg.scale_rewards != GRPOConfig.scale_rewards and cfg.advantage != "grpo":
        raise ConfigError(f"scale_rewards is used by advantage=grpo only (got advantage={cfg.advantage})")
    if cfg.max_length != TrainConfig.max_length:
        raise ConfigError("max_length is not used by grpo: completions are max_new_tokens long")
    rollout = cfg.batch_size * cfg.num_generations
    minibatch = cfg.minibatch_size or rollout
    if rollout % minibatch or minibatch % cfg.grad_accum:
        raise ConfigError(
            f"minibatch_size={minibatch} must divide the rollout (batch_size x num_generations = {rollout}) "
            f"and be a multiple of grad_accum={cfg.grad_accum}"
        )
    if cfg.ppo_epochs < 1 or cfg.epsilon <= 0 or (cfg.epsilon_high is not None and cfg.epsilon_high <= 0):
        raise ConfigError("ppo_epochs must be >= 1 and epsilon, epsilon_high > 0")
    if cfg.beta < 0:
        raise ConfigError(f"beta={cfg.beta} must be >= 0 (0 = no KL penalty and no reference)")
    if cfg.beta > 0:
        if cfg.reference.mode == "precomputed":
            raise ConfigError(
                "reference.mode=precomputed does not apply to online training (every rollout is new); "
                "use reference.mode=copy, or adapter with lora.enabled=true"
            )
        check_reference_settings(cfg)
    return aggregation


def token_logps(model, batch: dict, *, chunk_size: int, temperature: float, with_entropy: bool) -> dict:
    """{"token_logps": (B, T) log-probs of the completion tokens at the sampling temperature, and
    "token_entropy" (B, T) when asked}; the batch function the prepared policy runs."""
    out = completion_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    logps = {"token_logps": out.token_logps}
    if out.token_entropy is not None:
        logps["token_entropy"] = out.token_entropy
    return logps


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1 (0 when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class GRPOObjective:
    """`loss_fn(model, batch)` for `optimizer_step`: the clipped surrogate on the batch's advantages plus
    β·KL to the reference, aggregated over its `loss_mask` as `aggregation` says."""

    cfg: GRPOConfig
    aggregation: str

    def units(self, batch: dict) -> float:
        """What this micro-batch's loss is a mean over (tokens or sequences), for `optimizer_step`."""
        return float(aggregation_units(batch["loss_mask"], mode=self.aggregation))

    def _how(self) -> dict:
        return {"mode": self.aggregation, "max_completion_length": self.cfg.max_new_tokens}

    def __call__(self, model, batch: dict):
        out = model(batch)
        logps, mask = out["token_logps"], batch["loss_mask"]
        # Fully on-policy (one epoch, one minibatch): the sampling policy is this very forward.
        old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()
        per_token, metrics = clipped_surrogate(
            logps,
            old_logps,
            batch["advantages"],
            mask,
            epsilon=self.cfg.epsilon,
            epsilon_high=self.cfg.epsilon_high,
        )
        if self.cfg.beta > 0:
            old = old_logps if self.cfg.kl_importance_correction else None
            kl = kl_estimate(logps, batch["ref_logps"], estimator=self.cfg.kl_estimator, old_logps=old)
            per_token = per_token + self.cfg.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), mask)
        loss, _ = aggregate(per_token, mask, **self._how())
        metrics["entropy"] = masked_mean(out["token_entropy"].detach(), mask)
        metrics["loss"] = loss.detach()
        return loss, metrics


def minibatches(n: int, cfg: GRPOConfig, seed: int) -> list[list[list[int]]]:
    """Every optimizer step of one rollout of n rows: `ppo_epochs` passes, each a seeded shuffle cut into
    minibatches of `minibatch_size` rows, each cut into `grad_accum` micro-batches (lists of rows)."""
    size = cfg.minibatch_size or n
    micro = size // cfg.grad_accum
    steps = []
    for epoch in range(cfg.ppo_epochs):
        if cfg.ppo_epochs == 1 and size == n:
            order = list(range(n))
        else:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            ).tolist()
        for start in range(0, n, size):
            rows = order[start : start + size]
            steps.append([rows[m : m + micro] for m in range(0, size, micro)])
    return steps


def encode_prompts(rows, tokenizer, max_prompt_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, cut from the left to its last `max_prompt_length` tokens (the end, where
    the completion starts, is kept); returns them and how many were cut."""
    ids, cut = [], 0
    for row in rows:
        encoded = tokenizer(row.prompt)["input_ids"]
        if len(encoded) > max_prompt_length:
            encoded, cut = encoded[-max_prompt_length:], cut + 1
        ids.append(encoded)
    return ids, cut


def rollout_metrics(rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
    """What an expert reads first about a rollout: reward per source, zero-std groups, lengths, EOS."""
    lengths = torch.tensor(rollout.completion_lengths, dtype=torch.float32)
    out = {
        "reward": float(rollout.scores.mean()),
        "reward_std": float(rollout.scores.std(unbiased=False)),
        "frac_reward_zero_std": float(frac_reward_zero_std(rollout.scores, rollout.group_size)),
        "completion_length": float(lengths.mean()),
        "frac_eos": float(rollout.ended.float().mean()),
        "advantages/mean": float(advantages.mean()),
        "advantages/std": float(advantages.std(unbiased=False)),
    }
    for name, scores in rollout.source_scores.items():
        out[f"rewards/{name}/mean"] = float(scores.mean())
        out[f"rewards/{name}/std"] = float(scores.std(unbiased=False))
    out.update({f"rewards/{k}": v for k, v in rollout.reward_stats.items() if not k.startswith("reward/")})
    return out


def train(cfg: GRPOConfig) -> Path:
    """Train a policy online on prompt rows against a reward set; returns the saved final model's folder."""
    aggregation = check_settings(cfg)
    rewards = RewardSet.from_specs(cfg.rewards, normalize=cfg.reward_normalize, clip=cfg.reward_clip)
    if rewards.cost_thresholds:  # a constraint cost would otherwise drop out of the total unseen
        raise ConfigError(
            f"rewards: {', '.join(rewards.cost_thresholds)} set cost_threshold, and grpo does not train "
            "against constraint costs yet; give the source a negative weight instead"
        )
    accelerator, log, output_dir = start_run(cfg)
    G = cfg.num_generations

    # Prompts: validated (file:line:field) and tokenised before any model loads.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    rows = load_prompt_rows(cfg.data, cfg.data_split, tokenizer)
    if cfg.eval_data:
        train_rows, eval_rows = rows, load_prompt_rows(cfg.eval_data, cfg.eval_split, tokenizer)
    else:
        train_rows, eval_rows = _split_eval(rows, cfg.eval_fraction, cfg.seed)
    prompt_ids, cut = encode_prompts(train_rows, tokenizer, cfg.max_prompt_length)
    eval_ids, eval_cut = encode_prompts(eval_rows, tokenizer, cfg.max_prompt_length)
    log(
        f"{len(train_rows)} training and {len(eval_rows)} eval prompts; {cut + eval_cut} cut to max_prompt_length"
    )

    # The policy (dropout off: the first ratio must be exactly 1) and the frozen reference.
    model = disable_dropout(load_policy(cfg, tokenizer.pad_token_id, accelerator.device))
    fn_kwargs = {"chunk_size": cfg.logprob_chunk_size, "temperature": cfg.temperature}

    def policy_fn(m, batch: dict, with_entropy: bool = True) -> dict:
        return token_logps(m, batch, **fn_kwargs, with_entropy=with_entropy)

    def reference_fn(m, batch: dict) -> dict:
        return token_logps(m, batch, **fn_kwargs, with_entropy=False)

    reference: Reference | None = None
    if cfg.beta > 0:
        reference, _ = setup_reference(cfg, model, accelerator, reference_fn, ("token_logps",), None)
    if cfg.lora.enabled:
        model = disable_dropout(add_lora(model, cfg.lora))
    objective = GRPOObjective(cfg, aggregation)

    order = DataOrder(
        len(train_rows),
        cfg.batch_size,
        1,
        cfg.seed,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.shuffle,
    )
    steps = total_steps(cfg, order)
    n_rows = cfg.batch_size * G
    minibatches_per_epoch = n_rows // (cfg.minibatch_size or n_rows)
    updates_per_step = cfg.ppo_epochs * minibatches_per_epoch
    on_policy = updates_per_step == 1  # one update per rollout: no separate pass for the old log-probs
    optimizer, scheduler = make_optimizer(model, cfg, steps * updates_per_step)
    policy, optimizer = accelerator.prepare(BatchForward(model, policy_fn), optimizer)
    sampling = SamplingSettings(
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k or None,
        cfg.top_p if cfg.top_p < 1 else None,
        cfg.generation_batch_size,
    )

    checkpointer = Checkpointer(output_dir, cfg.save_total_limit)

    def named() -> dict:
        return {
            "model": accelerator.unwrap_model(policy),
            "optimizer": optimizer,
            "scheduler": scheduler,
            "rewards": rewards,
        }

    start = 0
    latest = checkpointer.latest() if cfg.resume else None
    if latest is not None:
        start = checkpointer.load(latest, named())["step"]
        log(f"resumed from {latest} at step {start}")
    logger = MetricsLogger(output_dir, accelerator.is_main_process, start if latest is not None else None)

    def save(step: int) -> Path | None:
        accelerator.wait_for_everyone()
        return checkpointer.save(step, named()) if accelerator.is_main_process else None

    def evaluate(step: int) -> dict:
        # One sample per eval prompt, the same seed every time, the normaliser left as it is.
        rollout = collect(
            accelerator.unwrap_model(policy).model,
            tokenizer,
            eval_ids,
            [r.prompt for r in eval_rows],
            rewards,
            group_size=1,
            sampling=sampling,
            seed=cfg.seed + 1,
            update_rewards=False,
        )
        out = {
            "reward": float(rollout.scores.mean()),
            "completion_length": sum(rollout.completion_lengths) / len(rollout.completion_lengths),
        }
        out.update({f"rewards/{n}/mean": float(v.mean()) for n, v in rollout.source_scores.items()})
        return {"step": step, "split": "eval", **out}

    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        initial=start,
        disable=not (cfg.progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    step = start
    try:
        while step < steps:
            t0 = time.perf_counter()
            idx = order.micro_batches(step)[0]
            seed = (cfg.seed * 1_000_003 + step) * 1009 + accelerator.process_index
            rollout = collect(
                accelerator.unwrap_model(policy).model,
                tokenizer,
                [prompt_ids[i] for i in idx],
                [train_rows[i].prompt for i in idx],
                rewards,
                group_size=G,
                sampling=sampling,
                seed=seed,
            )
            scale = cfg.scale_rewards if cfg.advantage == "grpo" else None
            advantages = compute_advantages(cfg.advantage, rollout.scores, G, scale=scale)
            keep = rollout.ended | (not cfg.mask_truncated)
            loss_mask = rollout.completion_mask * keep.unsqueeze(-1)
            plan = minibatches(n_rows, cfg, seed)

            # Log-probs of the sampling policy and the reference, in the micro-batches of the first
            # minibatches, so that before the first update the ratio is exactly 1.
            t1 = time.perf_counter()
            micro_rows = [rows_ for update in plan[:minibatches_per_epoch] for rows_ in update]
            policy.eval()  # (no dropout either way; eval skips DDP's forward bookkeeping)
            if not on_policy:
                rollout.old_logps = token_logps_in_batches(
                    lambda b: policy(b, with_entropy=False),  # noqa: B023
                    rollout,
                    micro_rows,
                    accelerator.device,
                )
            if reference is not None:
                rollout.ref_logps = token_logps_in_batches(
                    lambda b: reference(policy, b),  # noqa: B023
                    rollout,
                    micro_rows,
                    accelerator.device,
                )
            t2 = time.perf_counter()

            policy.train()
            records = []
            for update in plan:
                batches = [
                    {
                        k: v.to(accelerator.device)
                        for k, v in rollout.batch(rows_, advantages=advantages, loss_mask=loss_mask).items()
                    }
                    for rows_ in update
                ]
                records.append(
                    optimizer_step(
                        accelerator,
                        policy,
                        optimizer,
                        scheduler,
                        batches,
                        objective,
                        units=[objective.units(b) for b in batches],
                        max_grad_norm=cfg.max_grad_norm,
                    )
                )
            t3 = time.perf_counter()
            step += 1
            trained = {k: torch.stack([r[k] for r in records]).mean() for k in records[0]}
            record = {**as_numbers(trained), **rollout_metrics(rollout, advantages)}
            tokens = float(rollout.attention_mask.sum())
            record.update(
                {
                    "time/generation": rollout.timings["generation"],
                    "time/scoring": rollout.timings["scoring"],
                    "time/logprobs": t2 - t1,
                    "time/training": t3 - t2,
                    "time/step": t3 - t0,
                    "tokens/s/generation": rollout.num_tokens / max(rollout.timings["generation"], 1e-9),
                    "tokens/s/training": tokens * cfg.ppo_epochs / max(t3 - t2, 1e-9),
                }
            )
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0.0):.4f}")
            if step % cfg.logging_steps == 0 or step == steps:
                logger.log({"step": step, "split": "train", **record})
            if eval_rows and (step % cfg.eval_steps == 0 or step == steps):
                logger.log(evaluate(step))
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        path = save(step)
        if path is not None:
            print(f"\ninterrupted: checkpoint written to {path}; continue with resume=true")
        raise SystemExit(130) from None
    bar.close()
    return save_final(accelerator, policy, tokenizer, output_dir, cfg.lora.merge, log)
