"""PPO with a critic and a KL leash to a frozen reference: RLHF as Ziegler et al. 2019 and InstructGPT
(Ouyang et al. 2022) ran it, for causal LMs and encoder-decoder policies (T5, FLAN-T5).

    alignkit ppo model=PATH data=prompts.jsonl 'rewards=[{type: vader}]'
    alignkit ppo examples/ppo/flan_t5_summaries.yaml

Reads top to bottom: prompts -> policy, critic (+ reference) -> for each step: rollout (sample, score,
log-probs of the sampling policy and the reference, the critic's values) -> per-token reward (the score
on the last token, −β·KL on every token) -> GAE -> whitened advantages -> `ppo_epochs` x shuffled
minibatches of the shared optimizer step on the clipped surrogate + vf_coef · clipped value loss (early
stop at a target approx KL) -> adapt β -> metrics -> checkpoint. The maths is in alignkit.losses.ppo and
alignkit.losses.policy; the rollout in alignkit.rollout; the run loop every online method shares in
alignkit.training.loop (OnlineRun).

Policy and critic are one module (`PolicyAndValue`) trained by one optimizer on the summed loss, as
TRL's PPOv2 and the InstructGPT recipe do: one prepared module, one gradient sync, one step per minibatch.
An encoder-decoder policy differs only in its layout (the prompt is the encoder's source, the completion
the decoder's sequence: `rollout.collect`) and its forward (`logprobs.sequence_logps`, `ValueModel`);
the loop is the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.checks import check_online_settings
from alignkit.config.load import ConfigError, validate
from alignkit.config.online import PPOConfig
from alignkit.data.prompts import load_prompts
from alignkit.evaluation.policy import run_evaluator
from alignkit.generation.guided import load_guided_sampler, with_guided_backend
from alignkit.logprobs.completion import token_logps
from alignkit.losses.masks import masked_mean, whiten
from alignkit.losses.policy import aggregate, aggregation_units
from alignkit.losses.policy_losses import clipped_surrogate
from alignkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    explained_variance,
    fill_unscored,
    gae,
    kl_penalised_rewards,
)
from alignkit.models.load import (
    BatchForward,
    disable_dropout,
    is_encoder_decoder,
    load_policy,
    load_tokenizer,
)
from alignkit.models.lora import add_lora
from alignkit.models.reference import online_reference
from alignkit.models.value import VALUE_ADAPTER, ValueModel, value_adapter_on, value_model_from
from alignkit.rewards.compose import online_rewards
from alignkit.rollout import (
    importance_centred,
    rollout_metrics,
    run_sampler,
    sampler_correction,
    sampling_settings,
    timing_metrics,
    token_logps_in_batches,
)
from alignkit.training.guide_rollout import guide_metrics
from alignkit.training.loop import OnlineRun
from alignkit.training.order import minibatches
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import as_numbers, make_optimizer, optimizer_step, with_default_lr


def check_settings(cfg: PPOConfig) -> None:
    """Validate the PPO settings before anything loads: every field's range (declared on the config classes), then what
    needs several fields at once."""
    validate(cfg)
    check_online_settings(cfg, cfg.kl_coef, "kl_coef")
    if cfg.target_kl is not None and cfg.kl_coef == 0:
        raise ConfigError("target_kl (adaptive KL control) needs a starting kl_coef > 0")
    if cfg.target_kl is None and cfg.kl_horizon != PPOConfig.kl_horizon:
        raise ConfigError(
            f"kl_horizon={cfg.kl_horizon} has no effect without target_kl (it paces adaptive KL control); "
            "set target_kl or remove it"
        )
    if cfg.value_model == "adapter" and not cfg.lora.enabled:
        raise ConfigError("value_model=adapter (the critic as a second LoRA adapter) needs lora.enabled=true")


class PolicyAndValue(torch.nn.Module):
    """The policy LM and its critic as one module: `forward(batch)` -> {"token_logps", "token_entropy",
    "values"}, each (B, T) on the batch's sequence positions (what accelerate prepares and the loss calls).
    Log-probs and entropy are those of the sampling distribution (temperature, top_k / top_p)."""

    def __init__(
        self,
        policy: torch.nn.Module,
        value: ValueModel,
        *,
        chunk_size: int,
        temperature: float,
        top_k: int | None = None,
        top_p: float | None = None,
    ):
        super().__init__()
        self.policy, self.value = policy, value
        self.chunk_size = chunk_size
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    def forward(self, batch: dict, with_entropy: bool = True) -> dict:
        out = token_logps(
            self.policy, batch, chunk_size=self.chunk_size, with_entropy=with_entropy, **self.sampling
        )
        out["values"] = self.value(batch)
        return out


@dataclass
class PPOObjective:
    """`loss_fn(model, batch)` for `optimizer_step`: clipped surrogate on the batch's per-token advantages
    (times the batch's `sampler_weights`, π_old / π_sampler, where a sampler other than the trainer drew the
    rollout: `losses.off_policy`) plus vf_coef x clipped value loss (never weighted, as TRL's), both a
    token mean over the batch's `loss_mask`."""

    cfg: PPOConfig

    def units(self, batch: dict) -> float:
        """Completion tokens in the micro-batch (the loss is a token mean over the minibatch)."""
        return float(aggregation_units(batch["loss_mask"], mode="token_mean"))

    def __call__(self, model, batch: dict):
        out = model(batch)
        mask = batch["loss_mask"]
        policy_loss, metrics = clipped_surrogate(
            out["token_logps"],
            batch["old_logps"],
            batch["advantages"],
            mask,
            epsilon=self.cfg.epsilon,
            epsilon_high=self.cfg.epsilon_high,
        )
        if "sampler_weights" in batch:  # the policy term only; the ratio π/π_old is unchanged
            policy_loss = policy_loss * batch["sampler_weights"]
        value_loss, value_metrics = clipped_value_loss(
            out["values"],
            batch["old_values"],
            batch["returns"],
            mask,
            cliprange_value=self.cfg.cliprange_value,
        )
        loss, _ = aggregate(policy_loss + self.cfg.vf_coef * value_loss, mask, mode="token_mean")
        metrics.update(value_metrics)
        metrics["policy_loss"] = aggregate(policy_loss.detach(), mask, mode="token_mean")[0]
        metrics["value_loss"] = aggregate(value_loss.detach(), mask, mode="token_mean")[0]
        metrics["entropy"] = masked_mean(out["token_entropy"].detach(), mask)
        metrics["loss"] = loss.detach()
        return loss, metrics


def shape_rewards(cfg: PPOConfig, rollout, kl_coef: float, *, gather=None) -> dict[str, torch.Tensor]:
    """The rollout's per-token rewards, advantages and returns (all (N, T)), from its scores, log-probs
    and values: missing-EOS penalty -> −β·KL per token + score on the last token -> optional reward
    whitening -> GAE -> whitened advantages. With several processes `gather` (`OnlineRun.gather`) makes
    both whitenings take the whole step's statistics, every process's completion tokens.

    A completion no reward source scored (NaN: every source returned None) gets the mean score of the step's
    scored completions (every process's; 0 if none is scored): its score then says nothing relative to the
    batch, the analogue of GRPO's advantage 0, while its per-token KL penalty, a reward of its own that needs
    no source, is kept and trained on, as is the critic on its states. Masking it out of the loss instead
    would also drop that KL and the critic's targets; a score of 0 would be a reward or a penalty depending
    on the sources' scale."""
    mask = rollout.completion_mask
    scores = fill_unscored(rollout.scores.clone(), gather)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~rollout.ended).float()
    rewards, kl = kl_penalised_rewards(scores, rollout.old_logps, rollout.ref_logps, mask, kl_coef=kl_coef)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, gather=gather)
    advantages, returns = gae(rewards, rollout.old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
    return {
        "scores": scores,
        "rewards": rewards,
        "kl": kl,
        "advantages": whiten(advantages, mask, gather=gather),
        "raw_advantages": advantages,
        "returns": returns,
    }


def critic_and_reference(cfg: PPOConfig, lm, accelerator, sampling):
    """(policy, critic, reference, the reference's forward) around the loaded policy `lm`: the critic is
    built from the policy's weights before any adapter (or, value_model=adapter, is a second adapter on the
    policy's base: critic None until the adapters exist); with LoRA the policy gets its adapter and the
    critic its own. Dropout stays off everywhere, so the first ratio is exactly 1 and values deterministic."""
    shared_base = cfg.value_model == "adapter"
    value = None if shared_base else value_model_from(lm, cfg.value_model, cfg, accelerator.device)
    reference, reference_fn = online_reference(
        cfg, lm, accelerator, cfg.kl_coef, temperature=sampling.temperature
    )
    if cfg.lora.enabled:
        lm = disable_dropout(add_lora(lm, cfg.lora))
        if shared_base:
            value = value_adapter_on(lm, lm.peft_config["default"], accelerator.device)
        else:
            value.backbone = disable_dropout(
                add_lora(value.backbone, cfg.lora, task_type="FEATURE_EXTRACTION")
            )
            value.head.requires_grad_(True)
    return lm, value, reference, BatchForward(lm, reference_fn)  # adapter mode: the policy, adapter off


VF_LR_SCALE = 10.0
"""The critic's learning rate over the policy's when vf_lr is unset: verl's defaults (critic 1e-5, actor 1e-6);
measured on the shipped model (docs/ppo.md): at the policy's rate the critic's explained variance stayed ~0
over 100 steps and the held-out gain was less than half."""


def critic_lr(cfg: PPOConfig) -> float:
    """The critic's learning rate: vf_lr, or VF_LR_SCALE x lr."""
    return cfg.vf_lr if cfg.vf_lr is not None else VF_LR_SCALE * cfg.lr


def optimizer_groups(cfg: PPOConfig, module: PolicyAndValue, updates_per_step: int) -> list[dict]:
    """The trainable parameters as two optimizer groups (`training.step.make_optimizer`): the critic's at
    `critic_lr`, the policy's at lr, held at 0 for the first `critic_warmup` steps' updates. With
    value_model=adapter the critic is its head and the value adapter's weights on the shared base."""
    critic = list(module.value.head.parameters())
    named = module.value.backbone.named_parameters()
    if cfg.value_model == "adapter":  # the value adapter's weights on the base the policy shares
        critic += [p for n, p in named if f".{VALUE_ADAPTER}." in n and "lora_" in n]
    else:
        critic += [p for _, p in named]
    critic = [p for p in critic if p.requires_grad]
    ids = {id(p) for p in critic}
    policy = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    return [
        {"params": policy, "lr": cfg.lr, "hold": cfg.critic_warmup * updates_per_step},
        {"params": critic, "lr": critic_lr(cfg)},
    ]


def old_logps_and_values(model, reference, reference_forward, rollout, *, micro_rows, device) -> None:
    """Set the rollout's `old_logps` and `old_values` (the policy and critic as they sampled) and, with a
    reference, its `ref_logps`: (N, T) each, computed in `micro_rows`, the first epoch's micro-batches, so
    that before the first update the ratio is exactly 1."""
    model.eval()
    old = token_logps_in_batches(
        lambda b: model(b, with_entropy=False), rollout, micro_rows, device, keys=("token_logps", "values")
    )
    rollout.old_logps, rollout.old_values = old["token_logps"], old["values"]
    if reference is not None:
        rollout.ref_logps = token_logps_in_batches(
            lambda b: reference(reference_forward, b), rollout, micro_rows, device
        )["token_logps"]


def critic_metrics(shaped: dict, rollout, gather) -> dict:
    """The step's score, penalised reward, mean return and value, and the critic's explained variance, over
    every process's completions (`gather`)."""
    mask = rollout.completion_mask.bool()
    returns, values = gather(shaped["returns"][mask]), gather(rollout.old_values[mask])
    return {
        "score": float(gather(shaped["scores"]).mean()),
        "reward_penalised": float(gather(shaped["rewards"].sum(-1)).mean()),
        "returns/mean": float(returns.mean()),
        "values/mean": float(values.mean()),
        "explained_variance": float(
            explained_variance(values[None], returns[None], torch.ones_like(values[None]))
        ),
    }


def train(cfg: PPOConfig) -> Path:
    """Train a policy with PPO on prompt rows against a reward set; returns the saved final model's folder."""
    check_settings(cfg)
    rewards = online_rewards(cfg, "ppo")
    cfg = with_guided_backend(cfg)  # auto -> loop or hf (T5: hf; loop with a guide), saved with the run
    accelerator, log, output_dir = start_run(cfg)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    seq2seq = is_encoder_decoder(cfg.model, cfg.trust_remote_code)
    # (A T5 source keeps its EOS; every row must hold the columns the rewards read.)
    prompts = load_prompts(cfg, tokenizer, log, encoder_decoder=seq2seq, columns=rewards.columns)

    # Policy, critic and reference, dropout off in all three (`critic_and_reference`).
    lm = disable_dropout(
        load_policy(cfg, tokenizer.pad_token_id, accelerator.device, encoder_decoder_ok=True)
    )
    cfg = with_default_lr(cfg, lm, log)
    sampling = sampling_settings(cfg)
    fn_kwargs = {"chunk_size": cfg.logprob_chunk_size, **sampling.scoring()}  # as the sampler drew
    lm, value, reference, reference_forward = critic_and_reference(cfg, lm, accelerator, sampling)
    shared_base = cfg.value_model == "adapter"
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.target_kl is not None
        else FixedKLController(cfg.kl_coef)
    )
    objective = PPOObjective(cfg)

    def named() -> dict:
        return {
            "model": accelerator.unwrap_model(model),
            "optimizer": optimizer,
            "scheduler": scheduler,
            "rewards": rewards,
            "kl_controller": kl_ctl,
        }

    sampler = run_sampler(cfg, lm, tokenizer, prompts, mixed_precision=accelerator.mixed_precision)
    guided = load_guided_sampler(cfg, tokenizer, accelerator.device)  # None without a guide; frozen
    run = OnlineRun(
        cfg, accelerator, len(prompts.train_rows), named=named, log=log, sampler=sampler, guided=guided
    )
    n_rows = cfg.batch_size * cfg.num_generations
    minibatches_per_epoch = n_rows // (cfg.minibatch_size or n_rows)
    module = PolicyAndValue(lm, value, **fn_kwargs)
    updates_per_step = cfg.ppo_epochs * minibatches_per_epoch
    log(
        f"critic lr {critic_lr(cfg):.3g}"
        + ("" if cfg.vf_lr is not None else f" ({VF_LR_SCALE:g} x lr; set vf_lr= to choose)")
    )
    optimizer, scheduler = make_optimizer(
        module, cfg, run.steps * updates_per_step, groups=optimizer_groups(cfg, module, updates_per_step)
    )
    model, optimizer = accelerator.prepare(module, optimizer)
    run.resume()

    current = lambda: accelerator.unwrap_model(model).policy  # noqa: E731
    evaluate = run_evaluator(run, current, tokenizer, prompts, rewards, sampling=sampling)

    with run.interruptible():
        while run.step < run.steps:
            # 1. Rollout: this step's prompts (seeded by the step) -> one sample each -> reward-model scores.
            t0 = time.perf_counter()
            rollout, seed = run.collect(
                accelerator.unwrap_model(model).policy,
                tokenizer,
                prompts,
                rewards,
                sampling=sampling,
                group_size=cfg.num_generations,
            )
            plan = minibatches(n_rows, cfg, seed)

            # 2. The sampling policy's log-probs and the critic's values, (B, T), in the micro-batches of the first
            # epoch (so that before the first update the ratio is exactly 1), then the reference's; where
            # another sampler drew the rollout, the weights π_old / π_sampler (`sampler_correction`).
            t1 = time.perf_counter()
            micro_rows = [rows for update in plan[:minibatches_per_epoch] for rows in update]
            device = accelerator.device
            old_logps_and_values(
                model, reference, reference_forward, rollout, micro_rows=micro_rows, device=device
            )
            correction, sampler_record = sampler_correction(
                rollout, cfg.sampler_correction, cfg.sampler_correction_cap, gather=run.gather
            )
            # 3. Advantages: per-token rewards (score on the last token, −β·k1 on every token) -> GAE, whitened.
            shaped = shape_rewards(cfg, rollout, kl_ctl.value, gather=run.gather)
            # A guide drew it: centred on the policy's own mean, not the mixture's.
            shaped["advantages"] = importance_centred(
                shaped["advantages"], rollout, correction, gather=run.gather
            )
            keep = rollout.ended | (not cfg.mask_truncated)
            loss_mask = rollout.completion_mask * keep.unsqueeze(-1)
            t2 = time.perf_counter()

            # 4. Updates: ppo_epochs x minibatches (early stop at a target approx KL), policy and critic in one step.
            model.train()
            records = []
            for update in plan:
                batches = [
                    {
                        k: v.to(device)
                        for k, v in rollout.batch(
                            rows,
                            advantages=shaped["advantages"],
                            returns=shaped["returns"],
                            old_values=rollout.old_values,
                            loss_mask=loss_mask,
                            **correction,
                        ).items()
                    }
                    for rows in update
                ]
                records.append(
                    optimizer_step(
                        accelerator,
                        model,
                        optimizer,
                        scheduler,
                        micro_batches=batches,
                        loss_fn=objective,
                        units=[objective.units(b) for b in batches],
                        max_grad_norm=cfg.max_grad_norm,
                    )
                )
                if cfg.early_stop_kl and records[-1]["approx_kl"].item() > cfg.early_stop_kl:
                    break  # the same on every process: approx_kl is reduced over them
            t3 = time.perf_counter()

            # β follows the KL per completion of this rollout (over every process).
            sequence_kl = shaped["kl"].sum(-1).mean().to(device)
            if accelerator.num_processes > 1:
                sequence_kl = accelerator.reduce(sequence_kl, "mean")
            kl_coef = kl_ctl.value
            kl_ctl.update(float(sequence_kl), n_rows * accelerator.num_processes)

            # 5. Metrics, every figure over the whole step: each process's rows (or completion tokens),
            # gathered; 6. alarms, checkpoint (and eval) at the step's end, in finish_step.
            trained = {k: torch.stack([r[k] for r in records]).mean() for k in records[0]}
            mask = rollout.completion_mask.bool()
            raw_advantages = shaped["raw_advantages"][mask]
            record = {
                **as_numbers(trained),
                **rollout_metrics(
                    rollout, raw_advantages, gather=run.gather, gather_objects=run.gather_objects
                ),
            }
            record.update(
                {
                    "kl_ref": float(sequence_kl),
                    "kl_coef": kl_coef,
                    **critic_metrics(shaped, rollout, run.gather),
                    "updates": len(records),
                    **sampler_record,
                    **guide_metrics(rollout, gather=run.gather),
                    **timing_metrics(rollout, (t0, t1, t2, t3), passes=len(records) / minibatches_per_epoch),
                }
            )
            postfix = {"reward": record["reward"], "kl": record["kl_ref"]}
            returns = shaped["rewards"].sum(-1)  # (N,) the score less β·Σk1 (and the missing-EOS penalty)
            run.finish_step(
                record, evaluate if prompts.eval_rows else None, postfix, rollout=rollout, returns=returns
            )
    policy = accelerator.unwrap_model(model).policy
    if shared_base:  # the saved model is the policy: its adapter alone
        policy.delete_adapter(VALUE_ADAPTER)
    return save_final(accelerator, policy, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
