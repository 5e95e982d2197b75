"""What every online method (GRPO, RLOO, REINFORCE++, PPO) does the same way, written once: settings
checks, prompts, the policy's batch function, sampling settings, rollout minibatches, rollout metrics and
evaluation on held-out prompts. The loops themselves stay in their own files (`grpo.py`, `ppo.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from alignkit.config.base import OnlineConfig, TrainConfig
from alignkit.config.load import ConfigError
from alignkit.data.checks import unknown_text_rows
from alignkit.data.prepare import bad_rows_list, report_dropped, split_eval
from alignkit.data.prompts import PromptRow, encode_prompt_rows, load_prompt_rows
from alignkit.logprobs import sequence_logps
from alignkit.losses.policy import frac_reward_zero_std
from alignkit.models.reference import check_reference_settings, setup_reference
from alignkit.rewards import RewardSet
from alignkit.rewards.base import reduce_metrics
from alignkit.rewards.compose import weighted_sum
from alignkit.rollout import Rollout, SamplingSettings, collect
from alignkit.training.checkpoint import Checkpointer, default_fingerprint
from alignkit.training.loop import Interrupts, MetricsLogger, RunInterrupted
from alignkit.training.order import DataOrder, total_steps
from alignkit.training.setup import gather_objects, gather_rows


def check_online_settings(cfg: OnlineConfig, kl_weight: float, kl_name: str) -> None:
    """The checks every online method needs before anything loads: rewards given, the rollout cut into
    whole minibatches and micro-batches, clip ranges, and a reference mode that applies online (when
    `kl_weight`, the setting `kl_name`, is > 0 a reference is held; at 0 none is, and a `reference.*`
    setting changed from its default would be ignored, so it is an error naming it)."""
    if not cfg.rewards and not getattr(cfg, "judge", None):  # (online DPO may rank with a judge instead)
        raise ConfigError("rewards is empty: give at least one reward source, e.g. 'rewards=[{type: vader}]'")
    if cfg.max_length != TrainConfig.max_length:
        raise ConfigError("max_length is not used online: completions are max_new_tokens long")
    rollout = cfg.batch_size * cfg.num_generations
    minibatch = cfg.minibatch_size or rollout
    if rollout % minibatch or minibatch % cfg.grad_accum:
        raise ConfigError(
            f"minibatch_size={minibatch} must divide the rollout (batch_size x num_generations = {rollout}) "
            f"and be a multiple of grad_accum={cfg.grad_accum}"
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


def token_logps(
    model,
    batch: dict,
    *,
    chunk_size: int,
    temperature: float,
    with_entropy: bool,
    top_k: int | None = None,
    top_p: float | None = None,
) -> dict:
    """{"token_logps": (B, T) log-probs of the completion tokens under softmax(logits / temperature),
    renormalised over the top_k / top_p kept set when given, and "token_entropy" (B, T) when asked}; the
    batch function the prepared policy runs (a causal or, for batches with `encoder_input_ids`, an
    encoder-decoder policy)."""
    out = sequence_logps(
        model,
        batch,
        chunk_size=chunk_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
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


def minibatches(n: int, cfg: OnlineConfig, seed: int) -> list[list[list[int]]]:
    """Every optimizer step of one rollout of n rows: `ppo_epochs` passes, each a seeded shuffle cut into
    minibatches of `minibatch_size` rows, each cut into `grad_accum` micro-batches (lists of rows).

    The shuffle's seed is reduced modulo 2**64 (a step's seed times 1_000_003 passes it above seed
    ~18,282); the CPU generator reads only its low 32 bits, which the reduction keeps."""
    size = cfg.minibatch_size or n
    micro = size // cfg.grad_accum
    steps = []
    for epoch in range(cfg.ppo_epochs):
        if cfg.ppo_epochs == 1 and size == n:
            order = list(range(n))
        else:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
            ).tolist()
        for start in range(0, n, size):
            rows = order[start : start + size]
            steps.append([rows[m : m + micro] for m in range(0, size, micro)])
    return steps


def rollout_metrics(
    rollout: Rollout, advantages: torch.Tensor | None = None, *, gather=None, gather_objects=None
) -> dict[str, float]:
    """What an expert reads first about a rollout: reward per source, zero-std groups, lengths, EOS, the
    reward sources' own figures (a judge's retries and fallbacks, an ensemble's uncertainty), and the
    advantages' mean and std when the method has advantages (any shape: they are flattened).

    With several processes `gather` ((n, ...) -> every process's rows in rank order, `OnlineRun.gather`)
    and `gather_objects` (an object -> every process's, `OnlineRun.gather_objects`) make every figure the
    whole step's, as one process holding every row would log it: the sources' counters summed over the
    processes, their means weighted by rows (`rewards.base.reduce_metrics`)."""
    gather = gather or (lambda x: x)
    gather_objects = gather_objects or (lambda x: [x])
    scores = gather(rollout.scores)  # (N·W,) prompt-major: each process holds whole groups
    lengths = gather(torch.tensor(rollout.completion_lengths, dtype=torch.float32))
    out = {
        "reward": float(scores.mean()),
        "reward_std": float(scores.std(unbiased=False)),
        "completion_length": float(lengths.mean()),
        "frac_eos": float(gather(rollout.ended.float()).mean()),
    }
    if advantages is not None:
        advantages = gather(advantages.reshape(-1))
        out["advantages/mean"] = float(advantages.mean())
        out["advantages/std"] = float(advantages.std(unbiased=False))
    if rollout.group_size > 1:  # (with one completion per prompt every group is trivially unanimous)
        out["frac_reward_zero_std"] = float(frac_reward_zero_std(scores, rollout.group_size))
    for name, source in rollout.source_scores.items():  # (over every process)
        source = gather(source)
        out[f"rewards/{name}/mean"] = float(source.mean())
        out[f"rewards/{name}/std"] = float(source.std(unbiased=False))
        out[f"rewards/{name}/min"] = float(source.min())
        out[f"rewards/{name}/max"] = float(source.max())
    parts = gather_objects(rollout.source_metrics)  # every process's {source: its metrics()}
    for name in rollout.source_metrics:
        out.update({f"rewards/{name}/{k}": v for k, v in reduce_metrics([p[name] for p in parts]).items()})
    return out


@dataclass
class Prompts:
    """A run's training and eval prompts, as rows (text, where they came from) and token ids."""

    train_rows: list[PromptRow]
    eval_rows: list[PromptRow]
    train_ids: list[list[int]]
    eval_ids: list[list[int]]


def load_prompts(cfg, tokenizer, log=print, *, encoder_decoder: bool = False) -> Prompts:
    """The config's prompt rows, validated (file:line:field) and tokenised by the one prompt encoder
    (`data.prompts`: one BOS; a causal prompt ends at its text, an `encoder_decoder` policy's source keeps
    the EOS its tokenizer appends; a conversation over max_prompt_length refused) before any model loads; the
    eval prompts are `eval_data` or an `eval_fraction` of `data`. Conversations get the config's
    system_prompt and chat_template_kwargs. With on_bad_rows=skip bad rows are left out, listed in the
    log and in output_dir/dropped_rows.jsonl."""
    skipped = bad_rows_list(cfg)  # on_bad_rows=skip collects the bad rows here instead of refusing
    template = {"system_prompt": cfg.system_prompt, "chat_template_kwargs": cfg.chat_template_kwargs}
    rows = load_prompt_rows(cfg.data, cfg.data_split, tokenizer, skipped, **template)
    if cfg.eval_data:
        eval_rows = load_prompt_rows(cfg.eval_data, cfg.eval_split, tokenizer, skipped, **template)
        train_rows = rows
    else:
        train_rows, eval_rows = split_eval(rows, cfg.eval_fraction, cfg.seed)
    for warning in unknown_text_rows(train_rows + eval_rows, tokenizer):
        log(warning)
    train_rows, train_ids, cut = encode_prompt_rows(
        train_rows, tokenizer, cfg.max_prompt_length, skipped, encoder_decoder=encoder_decoder
    )
    eval_rows, eval_ids, eval_cut = encode_prompt_rows(
        eval_rows, tokenizer, cfg.max_prompt_length, skipped, encoder_decoder=encoder_decoder
    )
    report_dropped(cfg, skipped or [], log)
    log(
        f"{len(train_rows)} training and {len(eval_rows)} eval prompts; {cut + eval_cut} cut to max_prompt_length"
    )
    return Prompts(train_rows, eval_rows, train_ids, eval_ids)


def online_rewards(cfg: OnlineConfig, command: str) -> RewardSet:
    """The config's reward set; sources with a constraint cost are refused (they would drop out of the
    total unseen: no online method trains against costs yet)."""
    rewards = RewardSet.from_specs(cfg.rewards, normalize=cfg.reward_normalize, clip=cfg.reward_clip)
    if rewards.cost_thresholds:
        raise ConfigError(
            f"rewards: {', '.join(rewards.cost_thresholds)} set cost_threshold, and {command} does not train "
            "against constraint costs yet; give the source a negative weight instead"
        )
    return rewards


def default_lr(num_parameters: int, lora: bool = False) -> float:
    """The learning rate `lr=none` resolves to: 1e-6 x sqrt(7e9 / num_parameters), x10 for a LoRA adapter.

    One constant cannot serve every online method's models: GRPO recipes for 7B policies use 1e-6 (DeepSeekMath, Dr. GRPO,
    TRL's default), GPT-2-sized PPO ~1e-5 (TRL's sentiment example: 1.41e-5), and the shipped 656K-parameter
    model barely moves at 1e-5 in an epoch (+0.02 reward) but learns at 1e-4. An inverse square root of the
    size through the 7B anchor gives 2.6e-6 at 1B, 7.5e-6 at 124M and 1.03e-4 at 656K. LoRA's best rate is
    about 10x full fine-tuning's (Schulman et al. 2025, "LoRA Without Regret"), hence the factor.
    """
    return 1e-6 * (7e9 / num_parameters) ** 0.5 * (10.0 if lora else 1.0)


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
    reference, _ = setup_reference(cfg, model, accelerator, reference_fn, ("token_logps",), None)
    return reference, reference_fn


def with_default_lr(cfg: OnlineConfig, model, log=print) -> OnlineConfig:
    """`cfg` with `lr=none` resolved by `default_lr` from the loaded policy's size (logged), else as is."""
    if cfg.lr is not None:
        return cfg
    cfg = dataclasses.replace(
        cfg, lr=default_lr(sum(p.numel() for p in model.parameters()), cfg.lora.enabled)
    )
    log(f"lr {cfg.lr:.3g} (scaled to the policy's size; set lr= to choose one)")
    return cfg


def sampling_settings(cfg: OnlineConfig) -> SamplingSettings:
    """How the config samples completions (top_k 0 and top_p 1 mean no truncation)."""
    return SamplingSettings(
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k or None,
        cfg.top_p if cfg.top_p < 1 else None,
        cfg.generation_batch_size,
    )


def evaluate_policy(model, tokenizer, prompts: Prompts, rewards: RewardSet, sampling, seed: int) -> dict:
    """One sample per eval prompt from `model` (the unwrapped policy), the same seed every time and the
    reward normaliser left as it is: mean reward (total and per source) and completion length.

    With `reward_normalize` the eval reward is the weighted sum of the sources' raw scores (unclipped: the
    clip bounds normalised values), not the reward training uses: normalised by the moving training
    statistics, the same completions would score differently at every eval."""
    rollout = collect(
        model,
        tokenizer,
        prompts.eval_ids,
        [r.reward_input for r in prompts.eval_rows],
        rewards,
        group_size=1,
        sampling=sampling,
        seed=seed,
        update_rewards=False,
    )
    total = weighted_sum(rollout.source_scores, rewards.weights) if rewards.normalize else rollout.scores
    out = {
        "reward": float(total.mean()),
        "completion_length": sum(rollout.completion_lengths) / len(rollout.completion_lengths),
    }
    out.update({f"rewards/{n}/mean": float(v.mean()) for n, v in rollout.source_scores.items()})
    return out


def timing_metrics(rollout: Rollout, times: tuple[float, float, float, float], *, passes: float) -> dict:
    """Where a step's time went: generation and scoring (from the rollout), log-probs (t1 -> t2) and
    training (t2 -> t3) of a step that started at t0, with tokens/s of generation and of training
    (`passes` over the rollout's tokens)."""
    t0, t1, t2, t3 = times
    return {
        "time/generation": rollout.timings["generation"],
        "time/scoring": rollout.timings["scoring"],
        "time/logprobs": t2 - t1,
        "time/training": t3 - t2,
        "time/step": t3 - t0,
        "tokens/s/generation": rollout.num_tokens / max(rollout.timings["generation"], 1e-9),
        "tokens/s/training": float(rollout.attention_mask.sum()) * passes / max(t3 - t2, 1e-9),
    }


class OnlineRun:
    """The bookkeeping every online loop shares, around the algorithm's own step: which prompts and seed a
    step uses (`DataOrder`, functions of the seed and step), resuming from the newest checkpoint, metrics
    lines, eval and checkpoint intervals, the progress bar, and Ctrl-C as `training.loop.fit` handles it
    (`training.loop.Interrupts`: the step is finished and saved, or dropped; never saved half done: a step's
    several optimizer steps and its reward normaliser update are one unit).

        run = OnlineRun(cfg, accelerator, output_dir, len(prompts.train_rows), named, log)
        with run.interruptible():
            while run.step < run.steps:
                rollout, seed = run.collect(policy, tokenizer, prompts, rewards, sampling, G)
                ...                                     # advantages, updates
                run.finish_step(record, evaluate)

    `named()` returns the named state a checkpoint holds (models, optimizer, scheduler, reward normaliser,
    ...); it is restored here when `cfg.resume` finds a checkpoint.
    """

    def __init__(self, cfg: OnlineConfig, accelerator, output_dir, n_prompts: int, named, log=print):
        self.cfg, self.accelerator, self.named = cfg, accelerator, named
        self.order = DataOrder(
            n_prompts,
            cfg.batch_size,
            1,
            cfg.seed,
            accelerator.num_processes,
            accelerator.process_index,
            cfg.shuffle,
        )
        self.steps = total_steps(cfg, self.order)
        self.checkpointer = Checkpointer(output_dir, cfg.save_total_limit)
        self.output_dir, self.log = output_dir, log
        self.step = 0
        self.logger: MetricsLogger | None = None

    def resume(self) -> None:
        """Restore the newest checkpoint's state when `cfg.resume` (after the optimizer is prepared)."""
        latest = self.checkpointer.latest() if self.cfg.resume else None
        if latest is not None:
            defaults = default_fingerprint(self.cfg)
            self.step = self.checkpointer.load(latest, self.named(), defaults=defaults)["step"]
            self.log(f"resumed from {latest} at step {self.step}")
        resumed = self.step if latest is not None else None
        self.logger = MetricsLogger(self.output_dir, self.accelerator.is_main_process, resumed)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """`x`'s rows from every process in rank order (`training.setup.gather_rows`): what batch statistics,
        the reward normaliser and logged figures must see."""
        return gather_rows(self.accelerator, x)

    def gather_objects(self, obj) -> list:
        """`obj` of every process, in rank order (`training.setup.gather_objects`): counters and statistics that
        are not rows of a tensor, for the logged figures."""
        return gather_objects(self.accelerator, obj)

    def step_prompts(self) -> tuple[list[int], int]:
        """(prompt indices, sampling seed) of this process for the current step."""
        seed = (self.cfg.seed * 1_000_003 + self.step) * 1009 + self.accelerator.process_index
        return self.order.micro_batches(self.step)[0], seed

    def collect(self, policy, tokenizer, prompts: Prompts, rewards: RewardSet, sampling, group_size: int):
        """(rollout, seed): this process's rollout of the current step, `group_size` completions of each
        of its prompts from `policy` (the unwrapped model), sampled with the step's seed."""
        idx, seed = self.step_prompts()
        rollout = collect(
            policy,
            tokenizer,
            [prompts.train_ids[i] for i in idx],
            [prompts.train_rows[i].reward_input for i in idx],
            rewards,
            group_size=group_size,
            sampling=sampling,
            seed=seed,
            gather=self.gather,
        )
        return rollout, seed

    def save(self):
        """Write a checkpoint of the current step (main process); returns its folder or None."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        return self.checkpointer.save(self.step, self.named())

    def finish_step(self, record: dict, evaluate=None, postfix: dict | None = None) -> None:
        """Count the step done; log its record, evaluate (`evaluate(step) -> dict`) and checkpoint when
        the intervals say so."""
        cfg = self.cfg
        self.step += 1
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()})
        if self.step % cfg.logging_steps == 0 or self.step == self.steps:
            self.logger.log({"step": self.step, "split": "train", **record})
        if evaluate is not None and (self.step % cfg.eval_steps == 0 or self.step == self.steps):
            self.logger.log({"step": self.step, "split": "eval", **evaluate()})
        saved = cfg.save_steps > 0 and self.step % cfg.save_steps == 0 and self.step < self.steps
        path = self.save() if saved else None
        if self.step < self.steps and self._interrupts.stop_requested():  # Ctrl-C: this step is whole
            self._bar.close()
            self._interrupts.stop(path if saved else self.save(), self.step)

    @contextlib.contextmanager
    def interruptible(self):
        """The loop's body runs inside: a progress bar, and Ctrl-C handled by `training.loop.Interrupts`: the
        first finishes the step, saves it and raises `RunInterrupted`; a second drops the step unsaved and
        raises it too (the CLI exits 130; continue with resume=true)."""
        from tqdm.auto import tqdm

        show = self.cfg.progress and self.accelerator.is_main_process
        self._bar = tqdm(total=self.steps, initial=self.step, disable=not show, dynamic_ncols=True)
        with Interrupts(self.accelerator) as self._interrupts:
            try:
                yield self
            except RunInterrupted:
                raise
            except KeyboardInterrupt:
                self._bar.close()
                self._interrupts.drop(self.step, self.checkpointer.latest())
        self._bar.close()
