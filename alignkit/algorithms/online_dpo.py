"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): every step,
fresh completions of the step's prompts from the current policy, judged, and one DPO update on the pairs.

    alignkit online-dpo model=PATH data=prompts.jsonl 'rewards=[{type: vader}]'

Reads top to bottom: prompts -> policy + frozen reference -> for each step: rollout (`num_generations`
completions of each prompt on token ids, scored by the reward set or ranked by a pairwise judge's round robin)
-> `data.pairs.build_pairs` (best vs worst of each prompt whose gap exceeds `min_gap`) -> reference
log-probs of the pairs -> one optimizer step of the paired objective (`dpo.PairedObjective`, any loss of
the registry) -> metrics -> checkpoint. Unlike offline DPO, the pairs are always the current policy's own
samples, so the objective never trains on stale, off-policy data; unlike iterative DPO (`iterative.py`),
there are no rounds: the reference stays the starting model.

A sampler that is not the trainer (vLLM) needs no correction here: no ratio reads the sampler's
probabilities (the pairs are chosen by score, and DPO's loss holds for pairs drawn by any policy), so
`sampler_correction` is refused. Where a sampler that is not the trainer reported its log-probs, their gap
to the trainer's (`sampler/` metrics) is still logged, from one extra no-grad pass at the sampling distribution:
it is what shows a stale or mis-synced engine.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from alignkit.algorithms import dpo
from alignkit.config.checks import check_online_settings
from alignkit.config.load import ConfigError, validate
from alignkit.config.online import OnlineConfig, OnlineDPOConfig
from alignkit.data.pairs import build_pairs, pair_columns, sum_pair_stats
from alignkit.data.prompts import load_prompts
from alignkit.evaluation.policy import run_evaluator
from alignkit.generation.resolve import with_resolved_backend
from alignkit.logprobs.completion import token_logps
from alignkit.losses import get_loss
from alignkit.models.load import BatchForward, disable_dropout, load_policy, load_tokenizer
from alignkit.models.lora import add_lora
from alignkit.models.reference import online_reference
from alignkit.rewards.compose import online_rewards
from alignkit.rewards.ranking import JudgeRanking
from alignkit.rewards.registry import build_reward
from alignkit.rollout import (
    Rollout,
    needs_old_logps,
    rollout_metrics,
    run_sampler,
    sampler_correction,
    sampling_settings,
    timing_metrics,
    token_logps_in_batches,
)
from alignkit.training.loop import OnlineRun
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import as_numbers, make_optimizer, optimizer_step, with_default_lr


def check_settings(cfg: OnlineDPOConfig):
    """What must hold before anything loads; returns the objective's LossSpec."""
    validate(cfg)
    if cfg.judge and cfg.rewards and not (cfg.eval_data or cfg.eval_fraction):
        raise ConfigError(
            "with a judge, rewards only score eval prompts: set eval_data or eval_fraction, or drop rewards"
        )
    check_online_settings(cfg, cfg.beta, "beta", kl_logged=False)  # reference log-probs of the pairs only
    if cfg.ppo_epochs != 1 or cfg.minibatch_size:
        raise ConfigError("online DPO takes one update per rollout: ppo_epochs=1 and minibatch_size=0")
    if cfg.gap_as != "none" and cfg.loss != "sigmoid":
        raise ConfigError(
            f"gap_as={cfg.gap_as} feeds the pairs' gaps to the loss, which only loss=sigmoid reads"
        )
    if cfg.epsilon != OnlineConfig.epsilon or cfg.epsilon_high is not None or cfg.mask_truncated:
        raise ConfigError(
            "epsilon, epsilon_high and mask_truncated are clipped-ratio settings, which DPO has none of"
        )
    sampler_settings = ("sampler_correction", "sampler_correction_cap")
    if any(getattr(cfg, name) != getattr(OnlineConfig, name) for name in sampler_settings):
        raise ConfigError(
            "sampler_correction and sampler_correction_cap weight a policy-gradient loss by π_old / π_sampler; "
            "online DPO has no such loss (its pairs may come from any sampler): remove them"
        )
    spec = get_loss(cfg.loss)
    dpo.check_loss_settings(cfg, spec, defaults=OnlineDPOConfig())
    return spec


def pair_rows(pairs, group_size: int) -> list[int]:
    """The rollout rows of B pairs laid out as a batch: [chosen_1..B | rejected_1..B]."""
    G = group_size
    return [p.prompt * G + p.chosen for p in pairs] + [p.prompt * G + p.rejected for p in pairs]


def pair_batch(rollout: Rollout, pairs, columns: list[dict]) -> dict[str, torch.Tensor]:
    """B pairs as one batch of their 2B rollout rows (`pair_rows`), with their reference log-probs and
    per-pair columns (margin / preference)."""
    batch = rollout.batch(pair_rows(pairs, rollout.group_size))
    for key in columns[0] if columns else ():
        batch[key] = torch.tensor([c[key] for c in columns], dtype=torch.float32)
    return batch


def pair_sums(token_values: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"chosen", "rejected", "n_chosen", "n_rejected"} (each (B,)) from (2B, T) per-token values laid out
    [chosen | rejected]: the completion sums `dpo.paired_loss` reads."""
    sums, counts = (token_values * mask).sum(-1), mask.sum(-1).to(token_values.dtype)
    B = sums.shape[0] // 2
    return {"chosen": sums[:B], "rejected": sums[B:], "n_chosen": counts[:B], "n_rejected": counts[B:]}


def train(cfg: OnlineDPOConfig) -> Path:
    """Train a policy by online DPO on prompt rows; returns the saved final model's folder."""
    spec = check_settings(cfg)
    G = cfg.num_generations
    scorer = JudgeRanking(build_reward(cfg.judge, "judge"), G) if cfg.judge else None
    rewards = online_rewards(cfg, "online-dpo") if cfg.rewards else None
    scorer = scorer or rewards
    cfg = with_resolved_backend(cfg)  # generation.backend=auto -> loop or hf, saved with the run
    accelerator, log, output_dir = start_run(cfg)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    prompts = load_prompts(cfg, tokenizer, log, columns=rewards.columns if rewards else ())
    model = disable_dropout(load_policy(cfg, tokenizer.pad_token_id, accelerator.device))
    cfg = with_default_lr(cfg, model, log)
    # DPO's implicit reward β·log(π/π_ref) is of the policy and the reference themselves: both are scored
    # at temperature 1, untruncated, as iterative-dpo's rounds and TRL's OnlineDPOTrainer do; the sampling
    # settings only decide which completions become pairs (no importance ratio reads their probabilities).
    fn_kwargs = {"chunk_size": cfg.logprob_chunk_size, "temperature": 1.0, "with_entropy": False}
    sampling = sampling_settings(cfg)

    def policy_fn(m, batch: dict, as_sampled: bool = False) -> dict:
        if as_sampled:  # per token, at the sampling distribution: the sampler's gap (no loss reads them)
            return token_logps(m, batch, **{**fn_kwargs, **sampling.scoring()})
        return pair_sums(token_logps(m, batch, **fn_kwargs)["token_logps"], batch["completion_mask"])

    kl_weight = 1.0 if spec.needs_reference else 0.0
    reference, _ = online_reference(cfg, model, accelerator, kl_weight, temperature=1.0)
    if cfg.lora.enabled:
        model = disable_dropout(add_lora(model, cfg.lora))

    def precomputed_reference(m, batch: dict) -> dict:  # the reference's sums, taken before the update
        return pair_sums(batch["ref_logps"], batch["completion_mask"])

    objective = dpo.PairedObjective(cfg, spec, precomputed_reference, accelerator.gather)

    def named() -> dict:
        return {
            "model": accelerator.unwrap_model(policy),
            "optimizer": optimizer,
            "scheduler": scheduler,
            "rewards": scorer,
            "objective": objective.reward_mean,
        }

    sampler = run_sampler(cfg, model, tokenizer, prompts, mixed_precision=accelerator.mixed_precision)
    run = OnlineRun(cfg, accelerator, len(prompts.train_rows), named=named, log=log, sampler=sampler)
    optimizer, scheduler = make_optimizer(model, cfg, run.steps)
    policy, optimizer = accelerator.prepare(BatchForward(model, policy_fn), optimizer)
    run.resume()

    current = lambda: accelerator.unwrap_model(policy).model  # noqa: E731
    evaluate = run_evaluator(run, current, tokenizer, prompts, rewards, sampling=sampling)

    with run.interruptible():
        while run.step < run.steps:
            t0 = time.perf_counter()
            rollout, _ = run.collect(
                accelerator.unwrap_model(policy).model,
                tokenizer,
                prompts,
                scorer,
                sampling=sampling,
                group_size=G,
            )
            scores = rollout.scores.view(-1, G)
            ids = rollout.completion_ids()
            completion_ids = [ids[p * G : (p + 1) * G] for p in range(scores.shape[0])]
            pairs, stats = build_pairs(
                scores, strategy="best_worst", min_gap=cfg.min_gap, completions=completion_ids
            )
            # The step's pair statistics, over every process's table. Every process takes part in every
            # step (DDP); one with no pair of its own trains on its first prompt's pair with weight 0, and
            # a step with no pair anywhere is not taken.
            stats = sum_pair_stats(run.gather_objects(stats))
            total_pairs = stats.pairs
            weight = 1.0 if pairs else 0.0
            if not pairs:
                pairs = build_pairs(scores[:1], min_gap=-1.0)[0]
            columns = [pair_columns(p.gap, cfg.gap_as, cfg.soft_label_temperature) for p in pairs]

            t1 = time.perf_counter()
            policy.eval()
            micro = -(-len(pairs) // cfg.grad_accum)
            groups = [list(range(s, min(s + micro, len(pairs)))) for s in range(0, len(pairs), micro)]
            if reference is not None:
                rows = [pair_rows([pairs[i] for i in g], G) for g in groups]
                rollout.ref_logps = token_logps_in_batches(
                    lambda b: reference(policy, b),  # noqa: B023
                    rollout,
                    rows,
                    accelerator.device,
                )["token_logps"]
            sampler_record = {}
            if needs_old_logps(
                rollout, "none"
            ):  # another sampler drew them (as many passes on every process)
                n, size = len(rollout.completions), -(-len(rollout.completions) // cfg.grad_accum)
                rollout.old_logps = token_logps_in_batches(
                    lambda b: policy(b, as_sampled=True),  # noqa: B023
                    rollout,
                    [list(range(s, min(s + size, n))) for s in range(0, n, size)],
                    accelerator.device,
                )["token_logps"]
                _, sampler_record = sampler_correction(
                    rollout, "none", cfg.sampler_correction_cap, gather=run.gather
                )
            t2 = time.perf_counter()
            policy.train()
            record = {}
            if total_pairs > 0:
                batches = [
                    {
                        k: v.to(accelerator.device)
                        for k, v in pair_batch(
                            rollout, [pairs[i] for i in g], [columns[i] for i in g]
                        ).items()
                    }
                    for g in groups
                ]
                trained = optimizer_step(
                    accelerator,
                    policy,
                    optimizer,
                    scheduler,
                    micro_batches=batches,
                    loss_fn=objective,
                    units=[weight * len(g) for g in groups],
                    max_grad_norm=cfg.max_grad_norm,
                )
                record.update(as_numbers(trained))
            t3 = time.perf_counter()
            record.update(
                {
                    **rollout_metrics(rollout, gather=run.gather, gather_objects=run.gather_objects),
                    **stats.as_dict(),
                    **sampler_record,
                }
            )
            record.update(timing_metrics(rollout, (t0, t1, t2, t3), passes=1.0))
            postfix = {"reward": record["reward"], "pairs": record["pairs/pairs"]}
            evaluated = evaluate if prompts.eval_rows and rewards is not None else None
            run.finish_step(record, evaluated, postfix, rollout=rollout, reference=False)  # (pairs' only)
    return save_final(accelerator, policy, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
