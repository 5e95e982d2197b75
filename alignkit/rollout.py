"""One rollout of an online method: sample -> decode -> score -> log-probs. GRPO, RLOO, REINFORCE++, PPO
and the iterative methods all collect their experience with `collect`.

The policy writes `num_generations` completions of every prompt, as token ids (never re-tokenised: the
ids the model sampled are the ids it is trained on). Completions are decoded once, for the reward
sources, which read text and re-encode it with their own tokenizers; they get a conversational prompt as
its messages (a reward model renders them in its own chat template), never the policy's chat markup.
Sequences are laid out right-padded as [prompt | completion | pad] with masks built from lengths, never from token values, so a tokenizer
whose pad id is its EOS id is safe: the EOS a completion ends with is scored, the padding after it is not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from alignkit.config.generation import VLLMSettings
from alignkit.config.load import ConfigError
from alignkit.generation.backends import ModelSampler, Sampler
from alignkit.generation.sampling import eos_ids
from alignkit.losses.off_policy import importance_weighted_means, sampler_statistics, sampler_weights
from alignkit.losses.policy import frac_reward_zero_std
from alignkit.models.load import adapter_base
from alignkit.rewards.base import reduce_metrics, row_context
from alignkit.rewards.compose import describe_scores


@dataclass
class SamplingSettings:
    """How completions are drawn (`sampling_settings` fills it from a config's `generation:` section)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    """None = no top-k truncation."""
    top_p: float | None = None
    """None = no nucleus truncation."""
    batch_size: int = 64
    backend: str = "auto"
    """The sampler: loop, hf or vllm as a run resolved it (`generation.resolve`); auto lets `sample_ids`
    choose per model."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """backend=vllm: the engine's settings."""

    def scoring(self) -> dict:
        """The settings the sampling policy's log-probs are scored with (`logprobs`' keywords): the
        distribution it drew from, tempered and renormalised over the top_k / top_p kept set (a reference
        stays untruncated at the temperature: `models.reference.online_reference`)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


@dataclass
class Rollout:
    """N = prompts x G completions, prompt-major (completion j of prompt i is row i·G + j)."""

    input_ids: torch.Tensor
    """(N, T) [prompt | completion | pad], right-padded."""
    attention_mask: torch.Tensor
    """(N, T) 1 on prompt and completion tokens."""
    completion_mask: torch.Tensor
    """(N, T) 1 on completion tokens (the EOS that ends one included)."""
    prompt_lengths: list[int]
    completion_lengths: list[int]
    ended: torch.Tensor
    """(N,) bool: the completion ended with an EOS token (else it hit max_new_tokens)."""
    prompts: list[str | list[dict]]
    """The N prompts as the reward sources read them (each repeated G times): a conversational row's
    messages, kept as such (a reward model applies its own chat template), else the text."""
    completions: list[str]
    """The N decoded completions (special tokens skipped)."""
    scores: torch.Tensor
    """(N,) the reward set's total."""
    source_scores: dict[str, torch.Tensor]
    """(N,) raw score of every reward source."""
    reward_stats: dict[str, float]
    """Per-source statistics of the batch, as the reward set reports them."""
    group_size: int
    sampler: str = "auto"
    """The backend that drew the completions (loop, hf, vllm; auto: the loop where it can drive the model)."""
    source_metrics: dict[str, dict] = field(default_factory=dict)
    """Every reward source's own `metrics()` (counters, `RowMean`s), by name, for reducing over processes
    (`rewards.base.reduce_metrics`)."""
    sampler_logps: torch.Tensor | None = None
    """(N, T) per-token log-probs the sampler reported for the tokens it drew (its own numbers: vLLM's
    kernels and precision may differ from the trainer's), laid out as `completion_mask`; None where the
    backend does not report them."""
    sampler_auto_correction: str = "sequence_mask"
    """What sampler_correction=auto applies where the sampler is not the trainer (`Sampled.auto_correction`)."""
    sampler_details: dict[str, torch.Tensor] = field(default_factory=dict)
    """(N,) figures the sampler reported per completion, by name (a guided sampler's: `guide_metrics`)."""
    sampler_is_trainer: bool = True
    """Whether `sampler_logps` are the trainer's own numbers for the same distribution (the loop and hf
    samplers); False where another engine or model drew the tokens (vLLM, a guide policy): the rollout is
    then off-policy by π_old / π_sampler, which `sampler_correction=auto` corrects."""
    old_logps: torch.Tensor | None = None
    """(N, T) per-token log-probs of the policy that sampled, as the trainer computes them, under its
    sampling distribution (tempered, and renormalised over the top_k / top_p kept set)."""
    ref_logps: torch.Tensor | None = None
    """(N, T) per-token log-probs of the reference."""
    old_values: torch.Tensor | None = None
    """(N, T) the critic's values when the rollout was taken (PPO)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in generation, scoring and reference log-probs."""
    encoder_input_ids: torch.Tensor | None = None
    """(N, S) the prompt as an encoder-decoder policy's source, right-padded; None for a causal policy,
    whose `input_ids` hold the prompt. With an encoder-decoder, `input_ids` is the decoder sequence
    [decoder start | completion | pad] and the per-token tensors are laid out on it."""
    encoder_attention_mask: torch.Tensor | None = None
    """(N, S) 1 on source tokens (encoder-decoder policies only)."""

    @property
    def num_tokens(self) -> int:
        return int(sum(self.completion_lengths))

    def completion_ids(self) -> list[list[int]]:
        """The N completions' token ids, as sampled (after the prompt, or after an encoder-decoder's start
        token)."""
        starts = (
            [1] * len(self.completion_lengths) if self.encoder_input_ids is not None else self.prompt_lengths
        )
        return [
            self.input_ids[r, start : start + n].tolist()
            for r, (start, n) in enumerate(zip(starts, self.completion_lengths))
        ]

    def batch(self, rows: list[int] | torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows as a batch (trimmed to their longest sequence), with per-row `extra` tensors."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        T = int(self.attention_mask[rows].sum(-1).max())
        out = {
            "input_ids": self.input_ids[rows, :T],
            "attention_mask": self.attention_mask[rows, :T],
            "completion_mask": self.completion_mask[rows, :T],
        }
        if self.encoder_input_ids is not None:
            S = int(self.encoder_attention_mask[rows].sum(-1).max())
            out["encoder_input_ids"] = self.encoder_input_ids[rows, :S]
            out["encoder_attention_mask"] = self.encoder_attention_mask[rows, :S]
        for name in ("sampler_logps", "old_logps", "ref_logps", "old_values"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value[rows, :T]
        for name, value in extra.items():
            out[name] = value[rows] if value.dim() == 1 else value[rows, :T]
        return out


def layout(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, completion_mask), each (N, T): [prompt | completion | pad] rows,
    masks from lengths (so pad == EOS is safe)."""
    T = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    N = len(prompt_ids)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(N, T, dtype=torch.long)
    completion_mask = torch.zeros(N, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return input_ids, attention_mask, completion_mask


@torch.no_grad()
def token_logps_in_batches(
    forward: Callable,
    rollout: Rollout,
    batches: list[list[int]],
    device: torch.device,
    *,
    keys: tuple[str, ...] = ("token_logps",),
) -> dict[str, torch.Tensor]:
    """{key: (N, T) float32} of the per-token outputs `forward(batch)[key]` over the rollout (log-probs
    by default; a critic's "values" too), computed in the given row batches (the same ones training will
    use, so that the first ratio is exactly 1)."""
    out = {key: torch.zeros(rollout.input_ids.shape, dtype=torch.float32) for key in keys}
    for rows in batches:
        batch = rollout.batch(rows)
        device_batch = {
            k: v.to(device) for k, v in batch.items() if not k.startswith(("old_", "ref_", "sampler_"))
        }
        result = forward(device_batch)
        for key in keys:
            value = result[key].float().cpu()
            out[key][torch.as_tensor(rows), : value.shape[1]] = value
    return out


def collect(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    prompts: list[str | list[dict]],
    *,
    rewards,
    group_size: int,
    sampling: SamplingSettings,
    seed: int,
    update_rewards: bool = True,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sampler: Sampler | None = None,
    columns: list[dict] | None = None,
    origins: list[str] | None = None,
    step: int | None = None,
    max_steps: int | None = None,
) -> Rollout:
    """Sample `group_size` completions of every prompt from `model` (the unwrapped policy), decode and
    score them with the reward set `rewards` (an `alignkit.rewards.RewardSet`), which reads `prompts`:
    each a conversation's messages or a text (`PromptRow.reward_input`), never the policy's rendering. Log-probs are added by
    the caller (`token_logps_in_batches`), which knows the batches training will use.
    update_rewards=False leaves the reward set's running normaliser as it is (evaluation). With several
    processes, `gather` ((B,) -> every process's (ΣB,), in rank order) lets the normaliser see the whole
    step's scores, so every process keeps one state. `sampler` draws the completions (default: `model`
    itself, `generation.backends.ModelSampler`); it must already follow `model`'s weights (`Sampler.sync`).
    The sampler's own log-probs of its tokens are kept (`Rollout.sampler_logps`). The sources that read row
    columns get a `ScoreContext` (`rewards.base.row_context`): each prompt's `columns` (`PromptRow.columns`)
    and `origins` (file:line) repeated per completion, the completions' token ids, and the training `step` of
    `max_steps`."""
    t0 = time.perf_counter()
    sampler = sampler or ModelSampler(sampling.backend)
    sampled = sampler.sample(
        model,
        tokenizer,
        prompt_ids,
        num_samples=group_size,
        seed=seed,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        batch_size=sampling.batch_size,
    )
    completion_ids = sampled.completion_ids
    t1 = time.perf_counter()
    rows_prompt_ids = [p for p in prompt_ids for _ in range(group_size)]
    rows_prompts = [p for p in prompts for _ in range(group_size)]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    context = row_context(
        columns if columns is not None else [{} for _ in prompts],
        group_size,
        origins=origins,
        completion_ids=[list(c) for c in completion_ids],
        step=step,
        max_steps=max_steps,
    )
    scored = rewards(rows_prompts, texts, update=update_rewards, gather=gather, context=context)
    t2 = time.perf_counter()
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    encoder: dict[str, torch.Tensor] = {}
    if model.config.is_encoder_decoder:  # the prompt is the source; the decoder writes from its start token
        start = [model.config.decoder_start_token_id]
        input_ids, attention_mask, completion_mask = layout(
            [start] * len(completion_ids), completion_ids, pad_id
        )
        source_ids, source_mask, _ = layout(rows_prompt_ids, [[] for _ in rows_prompt_ids], pad_id)
        encoder = {"encoder_input_ids": source_ids, "encoder_attention_mask": source_mask}
    else:
        input_ids, attention_mask, completion_mask = layout(rows_prompt_ids, completion_ids, pad_id)
    sampler_logps = torch.zeros(completion_mask.shape)  # (N, T), laid out as completion_mask
    sampler_logps[completion_mask.bool()] = torch.tensor([v for row in sampled.logps for v in row])
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        prompt_lengths=[len(p) for p in rows_prompt_ids],
        completion_lengths=[len(c) for c in completion_ids],
        ended=torch.tensor([bool(c) and c[-1] in eos for c in completion_ids]),
        prompts=rows_prompts,
        completions=texts,
        scores=scored.total.float(),
        source_scores={k: v.float() for k, v in scored.scores.items()},
        reward_stats=scored.stats,
        group_size=group_size,
        sampler=sampler.backend,
        sampler_is_trainer=sampler.is_trainer,
        sampler_logps=sampler_logps,
        sampler_auto_correction=sampled.auto_correction,
        sampler_details={k: torch.tensor(v, dtype=torch.float64) for k, v in sampled.details.items()},
        source_metrics=scored.metrics,
        timings={"generation": t1 - t0, "scoring": t2 - t1},
        **encoder,
    )


def rollout_metrics(
    rollout: Rollout, advantages: torch.Tensor | None = None, *, gather=None, gather_objects=None
) -> dict[str, float]:
    """What an expert reads first about a rollout: reward per source, zero-std groups, lengths, EOS, the
    reward sources' own figures (a judge's retries and fallbacks, an ensemble's uncertainty), and the
    advantages' mean and std when the method has advantages (any shape: they are flattened).

    With several processes `gather` ((n, ...) -> every process's rows in rank order, `OnlineRun.gather`)
    and `gather_objects` (an object -> every process's, `OnlineRun.gather_objects`) make every figure the
    whole step's, as one process holding every row would log it: the sources' counters summed over the
    processes, their means weighted by rows (`rewards.base.reduce_metrics`).

    Rewards are over the scored completions: a NaN (no source had an opinion) is left out, and the share of
    such completions is logged as `frac_unscored` (a source's own share as `rewards/<name>/none`) where
    there are some."""
    gather = gather or (lambda x: x)
    gather_objects = gather_objects or (lambda x: [x])
    scores = gather(rollout.scores)  # (N·W,) prompt-major: each process holds whole groups
    scored = scores[~scores.isnan()]
    lengths = gather(torch.tensor(rollout.completion_lengths, dtype=torch.float32))
    out = {
        "reward": float(scored.mean()) if scored.numel() else math.nan,
        "reward_std": float(scored.std(unbiased=False)) if scored.numel() else math.nan,
        "completion_length": float(lengths.mean()),
        "frac_eos": float(gather(rollout.ended.float()).mean()),
    }
    if scored.numel() < scores.numel():
        out["frac_unscored"] = 1 - scored.numel() / scores.numel()
    if advantages is not None:
        advantages = gather(advantages.reshape(-1))
        out["advantages/mean"] = float(advantages.mean())
        out["advantages/std"] = float(advantages.std(unbiased=False))
    if rollout.group_size > 1:  # (with one completion per prompt every group is trivially unanimous)
        out["frac_reward_zero_std"] = float(frac_reward_zero_std(scores, rollout.group_size))
    # Each source over every process (NaNs left out, their share as /none).
    for name, source in rollout.source_scores.items():
        out.update(describe_scores(gather(source), f"rewards/{name}"))
    parts = gather_objects(rollout.source_metrics)  # every process's {source: its metrics()}
    for name in rollout.source_metrics:
        out.update({f"rewards/{name}/{k}": v for k, v in reduce_metrics([p[name] for p in parts]).items()})
    return out


def own_tokens(rollout: Rollout) -> torch.Tensor:
    """(N, T) bool: the completion tokens the policy's own sampler drew (all of them but a guide's traces)."""
    mask = rollout.completion_mask.bool()
    flags = rollout.sampler_details.get("guide_trace")
    return mask if flags is None else mask & (flags == 0).unsqueeze(-1)


def make_sampler(
    backend: str,
    model,
    tokenizer,
    *,
    vllm_settings=None,
    source: str | None = None,
    max_model_len: int = 0,
    dtype: str | None = None,
) -> Sampler:
    """The sampler for a resolved `backend` (loop, hf or vllm; auto is the loop where it can drive the
    model, else hf). vllm: `source` is the policy's weights as loaded (hub name or folder; the engine
    starts from it and `sync` copies the trainer's weights in), `vllm_settings` a `VLLMSettings`,
    `max_model_len` the longest prompt + completion it must serve, `dtype` the colocated engine's (default:
    the model's parameters')."""
    if backend != "vllm":
        return ModelSampler(backend)
    if vllm_settings is not None and vllm_settings.mode == "server":
        from alignkit.generation.server import ServerSampler

        return ServerSampler(vllm_settings, eos=eos_ids(model, tokenizer))
    from alignkit.generation.vllm import ColocatedVLLM

    return ColocatedVLLM(
        source,
        model,
        tokenizer,
        settings=vllm_settings,
        max_model_len=max_model_len,
        dtype=dtype,
    )


MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def sampler_for(
    generation, model_source: str, model, tokenizer, prompt_ids, *, dtype: str | None = None
) -> Sampler:
    """`make_sampler` for a `generation` section whose backend is resolved, sampling from `model` (loaded from
    `model_source`, a hub name or folder): vLLM's engine starts from model_source's weights (a LoRA adapter
    folder's base model; the adapter arrives merged with the first sync) and serves the longest of
    `prompt_ids` plus max_new_tokens, unless generation.vllm.max_model_len says; `dtype` the colocated
    engine's."""
    return make_sampler(
        generation.backend,
        model,
        tokenizer,
        vllm_settings=generation.vllm,
        source=adapter_base(model_source) or model_source,
        max_model_len=max(map(len, prompt_ids), default=0) + generation.max_new_tokens,
        dtype=dtype,
    )


def run_sampler(cfg, model, tokenizer, prompts, *, mixed_precision: str = "no") -> Sampler:
    """The sampler of a run that samples from its policy `model` (loaded from `cfg.model`) by `cfg.generation`
    (backend resolved: `generation.resolve`; `sampler_for`), serving the run's `prompts` (`data.prompts.Prompts`).
    Under `mixed_precision` (accelerate's: bf16, fp16) the colocated engine computes in that dtype, as the
    trainer's forwards do, not in the fp32 of the master weights."""
    prompt_ids = [*prompts.train_ids, *prompts.eval_ids]
    dtype = MIXED_PRECISION_DTYPES.get(mixed_precision)
    return sampler_for(cfg.generation, cfg.model, model, tokenizer, prompt_ids, dtype=dtype)


def needs_old_logps(rollout: Rollout, setting: str) -> bool:
    """Whether `sampler_correction(rollout, setting, ...)` reads π_old (the trainer's recomputation of the
    rollout's log-probs), so that a fully on-policy step must take it too: a sampler that is not the trainer
    reported its log-probs, or a correction mode was asked for explicitly."""
    if rollout.sampler_logps is None:
        return False
    return not rollout.sampler_is_trainer or setting not in ("auto", "none")


def sampler_correction(
    rollout: Rollout, setting: str, cap: float, *, gather=None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The off-policy correction of a rollout and its `sampler/` metrics: ({"sampler_weights": (N, T)},
    to pass with each batch, or {} where no correction applies; the metrics, {} where the rollout carries
    no sampler log-probs). Where it does, `rollout.old_logps` must be set (the trainer's recomputation).

    `setting` is `OnlineConfig.sampler_correction` (`cap` its cap C): a mode of
    `losses.off_policy.sampler_weights`, none, or auto: where the rollout's sampler is not the trainer
    (`Rollout.sampler_is_trainer`) and reported its log-probs, the mode it asks for
    (`Rollout.sampler_auto_correction`: sequence_mask for vLLM, token_truncate for a guide), else none. `gather`
    (`OnlineRun.gather`) makes every figure the whole step's, over every process's tokens."""
    reported = rollout.sampler_logps is not None
    if reported and rollout.sampler_is_trainer and setting in ("auto", "none"):
        return {}, {}  # the trainer sampled: its log-probs are π_old's up to rounding, nothing to correct
    mode = setting
    if setting == "auto":
        mode = rollout.sampler_auto_correction if reported and not rollout.sampler_is_trainer else "none"
    if not reported:
        if mode != "none":
            raise ConfigError(
                f"sampler_correction={setting} weights the loss by the sampler's log-probs, which this "
                "rollout's sampler does not report; use sampler_correction=auto or none"
            )
        return {}, {}
    gather = gather or (lambda x: x)
    mask = own_tokens(rollout)  # (a guide's traces are shaped, never importance-corrected)
    log_ratios = gather((rollout.old_logps - rollout.sampler_logps)[mask])  # (M,) over every process
    weights, ratios = {}, None
    if mode != "none":
        w, ratios = sampler_weights(rollout.old_logps, rollout.sampler_logps, mask, mode=mode, cap=cap)
        if mode.startswith("sequence_") and "guide_trace" in rollout.sampler_details:  # the policy's rows
            ratios = ratios[rollout.sampler_details["guide_trace"] == 0]
        weights, ratios = {"sampler_weights": w}, gather(ratios)
    stats = sampler_statistics(log_ratios, ratios, mode=mode, cap=cap)
    return weights, {f"sampler/{k}": float(v) for k, v in stats.items()}


def importance_centred(
    advantages: torch.Tensor, rollout: Rollout, correction: dict, *, group_size: int = 0, gather=None
) -> torch.Tensor:
    """`advantages` of a rollout a guide drew (`generation.guided`: its sampler reports `alpha`), centred on
    their importance-weighted mean (`losses.off_policy.importance_weighted_means`: the baseline becomes the
    policy's own mean reward, not the mixture's); as they are for any other rollout, and where `correction`
    (`sampler_correction`'s) has no weights. (vLLM's weights are within rounding of 1: its advantages are left
    as TRL leaves them.)

    Group advantages, (N·W,) of every process's completions in rank order: each completion weighs its mean
    token weight, centred within its group of `group_size` (over the whole step at group_size 1); an
    unscored completion (NaN score) weighs 0 and keeps advantage 0 (`losses.policy`). Per-token
    advantages, (N, T) of this process: each completion token weighs its own weight, centred over every
    process's tokens (`gather`, `OnlineRun.gather`)."""
    if "sampler_weights" not in correction or "alpha" not in rollout.sampler_details:
        return advantages
    gather = gather or (lambda x: x)
    weights, mask = correction["sampler_weights"], rollout.completion_mask
    if advantages.dim() == 1:
        row_weights = gather(weights.sum(-1) / mask.sum(-1).clamp(min=1))  # (N·W,)
        unscored = gather(rollout.scores).isnan()  # no source scored them: out of the baseline, advantage 0
        row_weights = row_weights.masked_fill(unscored, 0.0)
        group = group_size if group_size > 1 else len(row_weights)
        means = importance_weighted_means(advantages, row_weights, group).repeat_interleave(group)
        return (advantages - means).masked_fill(unscored, 0.0)
    mask = mask.bool()
    values, weights = gather(advantages[mask]), gather(weights[mask])  # (M,) every process's tokens
    return advantages - importance_weighted_means(values, weights, len(values))


def sampling_settings(cfg) -> SamplingSettings:
    """How a config samples completions, from its `generation:` section (top_k 0 and top_p 1 mean no
    truncation)."""
    g = cfg.generation
    return SamplingSettings(
        g.max_new_tokens,
        g.temperature,
        g.top_k or None,
        g.top_p if g.top_p < 1 else None,
        g.batch_size,
        backend=g.backend,
        vllm=g.vllm,
    )


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
