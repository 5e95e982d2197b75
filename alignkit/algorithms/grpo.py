"""Online RL without a critic: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO (Ahmadian et al.
2024) and REINFORCE++ (Hu 2025), one loop with the advantage estimator as a setting.

    alignkit grpo model=PATH data=prompts.jsonl 'rewards=[{type: vader}]'
    alignkit grpo ... advantage=rloo          # or: alignkit rloo ...

Reads top to bottom: prompts -> policy (+ reference) -> for each step: rollout (sample G completions of
each prompt, score them, log-probs of the sampling policy and the reference) -> group advantages ->
`ppo_epochs` x minibatches of the shared optimizer step on the policy loss (`policy_loss`: GRPO's clipped
surrogate, GSPO or CISPO) + β·KL -> metrics -> checkpoint. DAPO's dynamic sampling and overlong punishment,
GDPO's normalise-then-sum advantage and high-entropy-token training are settings of the same loop
(alignkit.training.dynamic_sampling, alignkit.training.grpo_family). The maths is in alignkit.losses.policy and
alignkit.losses.policy_losses; the rollout in alignkit.rollout; the optimizer step and checkpoints are the
offline trainers' own (alignkit.training: step, loop, checkpoint).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.checks import check_online_settings
from alignkit.config.load import ConfigError, validate
from alignkit.config.online import GRPOConfig
from alignkit.data.prompts import load_prompts
from alignkit.evaluation.policy import run_evaluator
from alignkit.generation.guided import load_guided_sampler, with_guided_backend
from alignkit.logprobs.completion import token_logps
from alignkit.losses.masks import masked_mean
from alignkit.losses.policy import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    aggregation_units,
    compute_advantages,
    get_advantage,
    kl_estimate,
    kl_penalised_scores,
)
from alignkit.losses.policy_losses import clip_range, get_policy_loss
from alignkit.losses.policy_shaping import shaped_guide_loss
from alignkit.models.load import BatchForward, disable_dropout, load_policy, load_tokenizer
from alignkit.models.lora import add_lora
from alignkit.models.reference import online_reference
from alignkit.rewards.compose import online_rewards
from alignkit.rollout import (
    importance_centred,
    needs_old_logps,
    rollout_metrics,
    run_sampler,
    sampler_correction,
    sampling_settings,
    timing_metrics,
    token_logps_in_batches,
)
from alignkit.training.dynamic_sampling import collect_informative
from alignkit.training.grpo_family import RewardTerms, high_entropy_tokens
from alignkit.training.guide_rollout import guide_metrics, guide_traces, traces_logps, traces_metrics
from alignkit.training.loop import OnlineRun
from alignkit.training.order import minibatches
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import as_numbers, make_optimizer, optimizer_step, with_default_lr


def with_policy_loss_defaults(cfg: GRPOConfig) -> GRPOConfig:
    """`cfg` with the policy loss's own epsilon, epsilon_high and beta where they are unset (None), after
    refusing a clip range the loss cannot take (the check its function makes)."""
    loss = get_policy_loss(cfg.policy_loss)
    cfg = dataclasses.replace(
        cfg,
        epsilon=loss.epsilon if cfg.epsilon is None else cfg.epsilon,
        epsilon_high=loss.epsilon_high if cfg.epsilon_high is None else cfg.epsilon_high,
        beta=loss.beta if cfg.beta is None else cfg.beta,
    )
    try:
        clip_range(
            f"policy_loss={cfg.policy_loss}", cfg.epsilon, cfg.epsilon_high, lower_bound=loss.lower_bound
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def check_settings(cfg: GRPOConfig) -> GRPOConfig:
    """Validate the online settings before anything loads; returns the config with its automatic settings
    resolved (the policy loss's epsilon, epsilon_high and beta where unset; loss_aggregation; with beta > 0
    kl_in_reward and kl_estimator), as the run saves it."""
    validate(cfg)  # every field's range (declared on the config classes), beta >= 0 included
    spec = get_advantage(cfg.advantage)
    cfg = with_policy_loss_defaults(cfg)
    check_online_settings(cfg, cfg.beta, "beta")
    if cfg.num_generations < spec.min_group_size:
        raise ConfigError(
            f"num_generations={cfg.num_generations}: advantage '{cfg.advantage}' needs at least "
            f"{spec.min_group_size} completions per prompt"
        )
    if cfg.kl_estimator != "auto" and cfg.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(
            f"kl_estimator '{cfg.kl_estimator}' is not auto or one of {', '.join(KL_ESTIMATORS)}"
        )
    default_aggregation = get_policy_loss(cfg.policy_loss).default_aggregation or spec.default_aggregation
    if default_aggregation == "sequence_mean" and cfg.guide.model and cfg.guide.mode == "traces":
        default_aggregation = "token_mean"  # LUFFY's 1/Z: Z, the tokens of the guide's and the policy's
    aggregation = default_aggregation if cfg.loss_aggregation == "auto" else cfg.loss_aggregation
    if aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"loss_aggregation '{cfg.loss_aggregation}' is not auto or one of {', '.join(AGGREGATIONS)}"
        )
    if cfg.scale_rewards != GRPOConfig.scale_rewards and cfg.advantage != "grpo":
        raise ConfigError(f"scale_rewards is used by advantage=grpo only (got advantage={cfg.advantage})")
    if cfg.beta == 0:  # no KL term: its settings would be ignored
        for name in ("kl_in_reward", "kl_estimator", "kl_importance_correction"):
            if getattr(cfg, name) != getattr(GRPOConfig, name):
                raise ConfigError(
                    f"{name}={getattr(cfg, name)} has no effect with beta=0 (no KL term, no reference); "
                    "set beta > 0 or remove it"
                )
        return dataclasses.replace(cfg, loss_aggregation=aggregation)
    in_reward = spec.kl_in_reward(cfg.num_generations) if cfg.kl_in_reward is None else cfg.kl_in_reward
    if in_reward:
        # The reward's KL is Σ k1 of the sampling policy, a number, not a loss term: nothing to choose or
        # to importance-correct (Ahmadian et al. 2024; TRL's RLOO; OpenRLHF's reward KL is k1 too).
        why = "kl_in_reward=true" if cfg.kl_in_reward else f"the default of advantage={cfg.advantage}"
        if cfg.kl_estimator not in ("auto", "k1"):
            raise ConfigError(
                f"kl_estimator={cfg.kl_estimator} cannot be used with the KL in the reward ({why}): the "
                "reward subtracts beta x the summed k1, log(policy/reference), of each completion; remove "
                "kl_estimator, or set kl_in_reward=false for a KL loss term"
            )
        if cfg.kl_importance_correction:
            raise ConfigError(
                f"kl_importance_correction=True has no effect with the KL in the reward ({why}): it corrects "
                "a KL loss term; remove it, or set kl_in_reward=false"
            )
    estimator = cfg.kl_estimator
    if estimator == "auto":
        estimator = "k1" if in_reward else spec.kl_loss_estimator
    return dataclasses.replace(
        cfg, loss_aggregation=aggregation, kl_in_reward=in_reward, kl_estimator=estimator
    )


@dataclass
class GRPOObjective:
    """`loss_fn(model, batch)` for `optimizer_step`: the registered policy loss `cfg.policy_loss`
    (`losses.policy_losses.POLICY_LOSSES`) on the batch's advantages, its per-token loss times the batch's
    `sampler_weights` where a sampler other than the trainer drew the rollout (π_old / π_sampler,
    `losses.off_policy`), plus β·KL to the reference (unless the KL is in the reward; unweighted for vLLM's
    small numeric gap, as TRL's, but weighted the same where a guide drew the tokens: they are samples of the
    mixture q, and the KL is an expectation under π_old), aggregated over its `loss_mask` as `aggregation`
    says. `cfg` is resolved (`check_settings`).

    A guide's whole traces (guide.mode=traces: the batch's `guide_mask`, 1 on their tokens) take LUFFY's shaped
    term instead (`losses.policy_shaping.shaped_guide_loss`), unclipped, never importance-weighted, and no KL
    term: they are not the policy's samples, so k(π/π_ref) on them estimates no KL of the policy's (the
    correct weight π/g ≪ 1 would zero it), and a pull toward the reference on exactly the guide's tokens
    would undo what they teach; the policy's own completions keep the policy loss and the KL term."""

    cfg: GRPOConfig
    aggregation: str

    def units(self, batch: dict) -> float:
        """What this micro-batch's loss is a mean over (tokens or sequences), for `optimizer_step`."""
        return float(aggregation_units(batch["loss_mask"], mode=self.aggregation))

    def _how(self) -> dict:
        return {"mode": self.aggregation, "max_completion_length": self.cfg.generation.max_new_tokens}

    def __call__(self, model, batch: dict):
        out = model(batch)
        logps, mask = out["token_logps"], batch["loss_mask"]
        guide = batch.get("guide_mask")  # (B, T) 1 on a guide trace's tokens (guide.mode=traces)
        own = mask if guide is None else mask * (1 - guide)  # (B, T) the policy's own samples
        # Fully on-policy (one epoch, one minibatch): the sampling policy is this very forward.
        old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()
        policy_loss = get_policy_loss(self.cfg.policy_loss).fn
        per_token, metrics = policy_loss(
            logps,
            old_logps,
            batch["advantages"],
            own,
            epsilon=self.cfg.epsilon,
            epsilon_high=self.cfg.epsilon_high,
        )
        if "sampler_weights" in batch:  # the policy term only; the ratio π/π_old is unchanged
            per_token = per_token * batch["sampler_weights"]
        if "entropy_mask" in batch:  # top_entropy_fraction: the policy term of the high-entropy tokens only
            per_token = per_token * batch["entropy_mask"]
        if guide is not None:  # LUFFY: −f(π)·Â on the guide's tokens, f(π) = π / (π + γ)
            shaped = shaped_guide_loss(logps, batch["advantages"], mask * guide, gamma=self.cfg.guide.gamma)
            per_token = per_token + shaped
        if self.cfg.beta > 0 and not self.cfg.kl_in_reward:
            old = old_logps if self.cfg.kl_importance_correction else None
            kl = kl_estimate(logps, batch["ref_logps"], estimator=self.cfg.kl_estimator, old_logps=old)
            if self.cfg.guide.model and "sampler_weights" in batch:  # q's tokens: E_q[w·k] = E_π_old[k]
                kl = kl * batch["sampler_weights"]
            if guide is not None:  # the policy's own samples only (class docstring)
                kl = kl * (1 - guide)
            per_token = per_token + self.cfg.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), own)
        loss, _ = aggregate(per_token, mask, **self._how())
        metrics["entropy"] = masked_mean(out["token_entropy"].detach(), own)
        metrics["loss"] = loss.detach()
        return loss, metrics


def train(cfg: GRPOConfig) -> Path:
    """Train a policy online on prompt rows against a reward set; returns the saved final model's folder."""
    cfg = check_settings(cfg)
    rewards = online_rewards(cfg, "grpo")
    cfg = with_guided_backend(cfg)  # generation.backend=auto -> loop or hf (loop with a guide), saved
    accelerator, log, output_dir = start_run(cfg)
    G = cfg.num_generations

    # Prompts: validated (file:line:field) and tokenised before any model loads.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    prompts = load_prompts(cfg, tokenizer, log, columns=rewards.columns)  # the columns the rewards read

    # The policy (dropout off: the first ratio must be exactly 1) and the frozen reference.
    model = disable_dropout(load_policy(cfg, tokenizer.pad_token_id, accelerator.device))
    cfg = with_default_lr(cfg, model, log)
    sampling = sampling_settings(cfg)
    fn_kwargs = {"chunk_size": cfg.logprob_chunk_size, **sampling.scoring()}  # as the sampler drew

    def policy_fn(m, batch: dict, with_entropy: bool = True) -> dict:
        return token_logps(m, batch, **fn_kwargs, with_entropy=with_entropy)

    reference, _ = online_reference(cfg, model, accelerator, cfg.beta, temperature=sampling.temperature)
    if cfg.lora.enabled:
        model = disable_dropout(add_lora(model, cfg.lora))
    objective = GRPOObjective(cfg, cfg.loss_aggregation)

    def named() -> dict:
        return {
            "model": accelerator.unwrap_model(policy),
            "optimizer": optimizer,
            "scheduler": scheduler,
            "rewards": rewards,
        }

    sampler = run_sampler(cfg, model, tokenizer, prompts, mixed_precision=accelerator.mixed_precision)
    guided = load_guided_sampler(cfg, tokenizer, accelerator.device)  # None without a guide; frozen
    run = OnlineRun(
        cfg,
        accelerator,
        len(prompts.train_rows),
        named=named,
        log=log,
        sampler=sampler,
        guided=guided,
        extra_draws=cfg.dynamic_sampling_max_rollouts if cfg.dynamic_sampling else 0,
    )
    # What the advantages see: the reward (+ DAPO's overlong penalty), or every source apart (GDPO).
    terms = RewardTerms.of(cfg, rewards)
    n_rows = cfg.batch_size * G
    minibatches_per_epoch = n_rows // (cfg.minibatch_size or n_rows)
    updates_per_step = cfg.ppo_epochs * minibatches_per_epoch
    on_policy = updates_per_step == 1  # one update per rollout: no separate pass for the old log-probs
    kl_in_reward = cfg.beta > 0 and cfg.kl_in_reward  # ... unless the reward's KL needs them
    select = cfg.top_entropy_fraction is not None  # ... or the entropies of the sampling policy
    optimizer, scheduler = make_optimizer(model, cfg, run.steps * updates_per_step)
    policy, optimizer = accelerator.prepare(BatchForward(model, policy_fn), optimizer)
    run.resume()

    current = lambda: accelerator.unwrap_model(policy).model  # noqa: E731
    evaluate = run_evaluator(run, current, tokenizer, prompts, rewards, sampling=sampling)

    with run.interruptible():
        while run.step < run.steps:
            # 1. Rollout: this step's prompts (seeded by the step, so a resume redraws them) -> G samples
            # each -> rewards. (N·G rows, prompt-major.) With dynamic sampling, unanimous groups are dropped
            # and more prompts drawn (from a second seeded order) until the batch is full, or the bound is hit.
            t0 = time.perf_counter()
            rollout, seed, drawn = collect_informative(
                run,
                accelerator.unwrap_model(policy).model,
                tokenizer,
                prompts,
                rewards,
                sampling=sampling,
                group_size=G,
                reward_terms=terms,
                pad_id=tokenizer.pad_token_id,
            )
            keep = rollout.ended | (not cfg.mask_truncated)
            loss_mask = rollout.completion_mask * keep.unsqueeze(-1)
            plan = minibatches(n_rows, cfg, seed)

            # 2. Log-probs of the sampling policy and the reference, (N·G, T), in the micro-batches of the
            # first minibatches, so that before the first update the ratio is exactly 1. Where the sampler
            # is not the trainer (or a correction is asked for), π_old is taken even on-policy: the gap and the weights need it.
            t1 = time.perf_counter()
            micro_rows = [rows_ for update in plan[:minibatches_per_epoch] for rows_ in update]
            # With top_entropy_fraction, this pass also gives the sampling policy's entropies, from which one
            # threshold for the whole step picks the tokens the policy loss keeps.
            policy.eval()  # (no dropout either way; eval skips DDP's forward bookkeeping)
            selected, entropy_record = {}, {}
            if not on_policy or kl_in_reward or select or needs_old_logps(rollout, cfg.sampler_correction):
                old = token_logps_in_batches(
                    lambda b: policy(b, with_entropy=select),  # noqa: B023
                    rollout,
                    micro_rows,
                    accelerator.device,
                    keys=("token_logps", "token_entropy") if select else ("token_logps",),
                )
                rollout.old_logps = old["token_logps"]
                if select:
                    mask, entropy_record = high_entropy_tokens(
                        old["token_entropy"], loss_mask, cfg.top_entropy_fraction, gather=run.gather
                    )
                    selected = {"entropy_mask": mask}
            if reference is not None:
                rollout.ref_logps = token_logps_in_batches(
                    lambda b: reference(policy, b),  # noqa: B023
                    rollout,
                    micro_rows,
                    accelerator.device,
                )["token_logps"]
            correction, sampler_record = sampler_correction(
                rollout, cfg.sampler_correction, cfg.sampler_correction_cap, gather=run.gather
            )
            # Guide traces (guide.mode=traces): their tokens' flags, and π on them before the updates.
            traces = guide_traces(rollout)  # {"guide_mask": (N·G, T)}, or {}
            forward = lambda b: policy(b, with_entropy=False)  # noqa: E731
            guide_logps = traces_logps(forward, rollout, len(micro_rows[0]), accelerator.device)

            # 3. Advantages, from the scores (+ the overlong penalty) less β·Σk1 of each completion where the
            # KL is in the reward; with multi_reward=normalize_then_sum, from every source's scores apart.
            scores, kl_metrics = terms(rollout), {}
            if kl_in_reward:
                mask = rollout.completion_mask
                scores, sequence_kl = kl_penalised_scores(
                    scores, rollout.old_logps, rollout.ref_logps, mask, beta=cfg.beta
                )
                kl_metrics = {  # "kl" as with a loss term: the mean per completion token, over every process
                    "kl": float(run.gather(sequence_kl).sum() / run.gather(mask.sum(-1)).sum().clamp(min=1)),
                    "reward_penalised": float(run.gather(scores).nanmean()),  # (over scored completions)
                }
            # Advantages over the whole step: every process's (penalised) rewards, in rank order (GRPO's
            # batch std and REINFORCE++'s batch statistics see every completion, as on one process), then
            # this process's n_rows rows.
            scale = cfg.scale_rewards if cfg.advantage == "grpo" else None
            rank = accelerator.process_index
            if cfg.multi_reward == "normalize_then_sum":
                advantages = terms.gdpo_advantages(run.gather(scores), G)
            else:
                advantages = compute_advantages(cfg.advantage, run.gather(scores), G, scale=scale)
            # A guide drew it: the baseline is the policy's own mean reward, not the mixture's.
            advantages = importance_centred(advantages, rollout, correction, group_size=G, gather=run.gather)
            advantages = advantages[rank * n_rows : (rank + 1) * n_rows]  # (n_rows,)
            t2 = time.perf_counter()

            # 4. Updates: ppo_epochs x minibatches, each one optimizer step over its micro-batches.
            policy.train()
            records = []
            for update in plan:
                batches = [
                    {
                        k: v.to(accelerator.device)
                        for k, v in rollout.batch(
                            rows_,
                            advantages=advantages,
                            loss_mask=loss_mask,
                            **correction,
                            **selected,
                            **traces,
                        ).items()
                    }
                    for rows_ in update
                ]
                records.append(
                    optimizer_step(
                        accelerator,
                        policy,
                        optimizer,
                        scheduler,
                        micro_batches=batches,
                        loss_fn=objective,
                        units=[objective.units(b) for b in batches],
                        max_grad_norm=cfg.max_grad_norm,
                    )
                )
            # 5. Metrics, over every process; 6. alarms, checkpoint (and eval) at the step's end (finish_step).
            t3 = time.perf_counter()
            trained = {k: torch.stack([r[k] for r in records]).mean() for k in records[0]}
            record = {
                **as_numbers(trained),
                **rollout_metrics(rollout, advantages, gather=run.gather, gather_objects=run.gather_objects),
                **kl_metrics,
                **sampler_record,
                **guide_metrics(rollout, gather=run.gather),
                **drawn,
                **terms.metrics(rollout, gather=run.gather),
                **entropy_record,
                **traces_metrics(rollout, guide_logps, gamma=cfg.guide.gamma, gather=run.gather),
            }
            record.update(timing_metrics(rollout, (t0, t1, t2, t3), passes=cfg.ppo_epochs))
            postfix = {"reward": record["reward"], "kl": record.get("kl", 0.0)}
            # (N,) what the advantages see where it is not the reward: less β·Σk1, plus the overlong penalty
            returns = scores if scores.dim() == 1 and (kl_in_reward or cfg.overlong_cache) else None
            run.finish_step(
                record, evaluate if prompts.eval_rows else None, postfix, rollout=rollout, returns=returns
            )
    return save_final(accelerator, policy, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
