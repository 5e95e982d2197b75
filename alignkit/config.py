"""Dataclass configs: YAML files plus dotted `key=value` overrides; unknown keys are errors.

Every field has a one-line docstring under it; `field_docs` reads them from the source so that
`alignkit <command> --help` shows exactly what the code documents.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

# Organisational sections a YAML file may group top-level keys under (`train: {lr: ...}` or
# `train.lr=...` on the command line both set `lr`).
SECTION_ALIASES = ("train",)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class _YAML12Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2): `mixed_precision: no` stays the string 'no'."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text):
    return yaml.load(text, Loader=_YAML12Loader)


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, bad value or type."""


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft)."""

    enabled: bool = False
    """Train a LoRA adapter instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str = "all-linear"
    """Comma-separated module names to adapt, or 'all-linear'."""
    merge: bool = False
    """Save the final model with the adapter merged into full weights (else the adapter alone)."""


@dataclass
class ReferenceSettings:
    """The frozen reference model that a KL-regularised objective measures the policy against."""

    mode: str = "precomputed"
    """precomputed (its log-probs computed once before training, no model held), copy (a frozen copy
    in memory) or adapter (with lora.enabled: the base model with the adapter switched off)."""
    model: str | None = None
    """Reference weights when different from `model` (precomputed / copy); default: the policy's start."""


@dataclass
class TrainConfig:
    """Fields shared, with the same names, by every training command."""

    model: str = ""
    """Policy model: a Hugging Face hub name or a local directory."""
    tokenizer: str | None = None
    """Tokenizer to load (default: the model's)."""
    data: str = ""
    """Training rows: a .jsonl/.json/.parquet file or a Hugging Face dataset name."""
    data_split: str = "train"
    """Split to read when `data` is a Hugging Face dataset name."""
    eval_data: str | None = None
    """Evaluation rows (file or dataset name); default: `eval_fraction` of `data`."""
    eval_split: str = "test"
    """Split to read when `eval_data` is a Hugging Face dataset name."""
    eval_fraction: float = 0.0
    """Fraction of `data` held out for evaluation when `eval_data` is not given (0 = no eval)."""
    output_dir: str = "runs/out"
    """Where metrics, checkpoints, the resolved config and the final model are written."""
    max_steps: int = -1
    """Optimizer steps to run; -1 (or 0) = derive from `epochs`."""
    epochs: float = 1.0
    """Passes over the training rows (used when max_steps is -1)."""
    batch_size: int = 8
    """Rows (pairs for preference data) per micro-batch on each device."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule after warm-up: linear, cosine or constant."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = no clipping)."""
    max_length: int = 512
    """Maximum tokens of prompt + completion; completions are truncated from the right."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; prompts are truncated from the left (the end is kept)."""
    seed: int = 42
    """Seed for initialisation, data order and sampling."""
    shuffle: bool = True
    """Shuffle the rows each epoch (false: file order, e.g. for curriculum or side-by-side benchmarks)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""
    mixed_precision: str = "auto"
    """Autocast through accelerate: auto (bf16 where the device computes it natively: CUDA with bf16, CPUs
    with AVX512-BF16 or AMX; else fp32), no, bf16 or fp16."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers: eager, sdpa, flash_attention_2 (default: transformers')."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own code. Off unless you trust the source."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (lora.enabled=true to train an adapter)."""
    logging_steps: int = 1
    """Write train metrics every this many optimizer steps."""
    eval_steps: int = 50
    """Evaluate every this many optimizer steps (and at the end)."""
    save_steps: int = 100
    """Write a checkpoint every this many optimizer steps (0 = only on interrupt)."""
    save_total_limit: int = 2
    """Checkpoints to keep (older ones are deleted)."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir with the same data order."""
    overwrite: bool = False
    """Replace a run already in output_dir (its files are deleted first); without it, or resume, that is an error."""
    on_bad_rows: str = "refuse"
    """refuse (stop, listing every bad row) or skip (drop them, listed in the log and output_dir/dropped_rows.jsonl)."""
    logprob_chunk_size: int = 1024
    """Completion tokens projected to the vocabulary at once (bounds the logits memory)."""
    cache_dir: str | None = None
    """Where tokenised data and reference log-probs are cached (default: output_dir/cache)."""
    progress: bool = True
    """Show a console progress bar."""
    report: bool = True
    """Write output_dir/report.html (curves, tables, config; docs/reports.md) when the run ends."""
    report_to: str = "none"
    """Also log metrics to an experiment tracker through accelerate: none, tensorboard or wandb."""


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion rows (loss on completion tokens only)."""

    lr: float = 2e-5
    """Peak learning rate (AdamW)."""


@dataclass
class RewardConfig(TrainConfig):
    """A Bradley–Terry reward model trained on preference pairs (docs/reward_models.md)."""

    model: str = ""
    """Backbone: a causal LM (gets a scalar head on its last token) or an encoder such as BERT."""
    backbone: str = "auto"
    """causal, encoder, or auto (encoder for masked-LM architectures such as BERT, else causal)."""
    center_rewards_coefficient: float = 0.0
    """c of the centring term c·(r_w + r_l)² (Eisenstein et al. 2023) that keeps rewards near 0; 0 = off."""
    share_prompt: bool | None = None
    """Causal backbones: one [prompt|chosen|rejected] row per pair with a 4D mask, the prompt computed once
    (default on; encoders cannot: their prompt states depend on the response)."""
    group_by_length: bool = True
    """Draw each step's pairs from pairs of similar length, so batches are padded little."""
    disable_dropout: bool = True
    """Train without dropout (LoRA's too): it adds noise to the chosen-minus-rejected difference, and time."""
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(merge=True))
    """LoRA settings; the final model is saved merged (a plain classifier) unless lora.merge=false."""
    pooling: str = "auto"
    """What the head reads: mean (of the token states), cls, last (token), or auto (a sentence-transformers
    folder's own pooling, else the stock classifier's: cls for encoders, last for causal LMs)."""
    ensemble: int = 1
    """K > 1: K heads on one backbone, each from its own seed and bootstrap resample; rewards are their mean."""


@dataclass
class ConstraintSettings:
    """One constraint term added to a paired objective's loss (docs/objectives.md, "Constraints")."""

    type: str = ""
    """flagged_reward (penalise flagged responses whose implicit reward exceeds a threshold) or nll_anchor."""
    weight: float = 1.0
    """Weight of the term in the loss."""
    threshold: float = 0.0
    """flagged_reward: the implicit reward β·log-ratio a flagged response may reach before it is penalised."""
    temperature: float = 0.1
    """flagged_reward: τ of the penalty τ·softplus((r − threshold)/τ); 0 = the hinge max(0, r − threshold)."""
    scorer: dict | None = None
    """flagged_reward: a reward source (alignkit.rewards spec) that flags responses; default: the rows'
    chosen_flagged / rejected_flagged columns."""
    cutoff: float = 0.0
    """flagged_reward with a scorer: a response is flagged when its score is on the `flag_when` side of this."""
    flag_when: str = "below"
    """flagged_reward with a scorer: below (low scores are unsafe, e.g. a safety score) or above (toxicity)."""


@dataclass
class DPOConfig(TrainConfig):
    """Offline preference optimisation (DPO and its family) on preference pairs."""

    lr: float = 5e-7
    """Peak learning rate (AdamW)."""
    beta: float = 0.1
    """Strength of the KL tie to the reference (DPO's β); for orpo, λ (docs/objectives.md)."""
    loss: str = "sigmoid"
    """Preference objective by name: sigmoid, robust, hinge, ipo, gpo_*, bco_pair, rpo, simpo, cpo, orpo."""
    label_smoothing: float = 0.0
    """Conservative DPO (sigmoid) / robust DPO (robust): probability ε in [0, 0.5) a label is flipped."""
    gamma: float = 0.5
    """SimPO's target reward margin γ (reward units, β·mean log-prob; SimPO's gamma_beta_ratio is γ/β)."""
    nll_weight: float = 1.0
    """Weight α of the per-token NLL on the chosen completion that cpo and rpo add."""
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    """The frozen reference (reference.mode=precomputed|copy|adapter, reference.model=PATH)."""
    share_prompt: bool = True
    """Compute each pair's prompt once: one [prompt|chosen|rejected] row with a 4D mask (sdpa/eager)."""
    constraints: list[ConstraintSettings] = field(default_factory=list)
    """Terms added to the loss, e.g. [{type: flagged_reward, weight: 1.0}, {type: nll_anchor, weight: 0.1}]."""
    stages: int = 1
    """Stepwise DPO (sDPO): split the training rows, in file order, into this many stages, each trained
    against the previous stage's final model (in output_dir/stage-k)."""
    freeze_vision: bool = True
    """Vision-language models: keep the vision tower and the projector frozen; the language model trains."""
    mdpo: bool = False
    """Vision-language models: add mDPO's conditional term (chosen under the real vs a corrupted image) and
    anchor term to the loss (Wang et al. 2024; docs/vlm_dpo.md)."""
    mdpo_corruption: str = "crop"
    """mdpo: crop (a random box of the image, resized back to its size) or mask (all but the box blacked out)."""
    mdpo_keep: float = 0.2
    """mdpo: the largest share of the image's area the random box keeps (drawn per row, seeded)."""

    def __post_init__(self) -> None:
        # Constraints given as plain dicts from Python get the same key and type checks as from YAML.
        self.constraints = [
            from_mapping(ConstraintSettings, c, f"constraints[{i}]") if isinstance(c, dict) else c
            for i, c in enumerate(self.constraints)
        ]


@dataclass
class KTOConfig(TrainConfig):
    """Unpaired preference optimisation (KTO, BCO) on {prompt, completion, label} rows."""

    lr: float = 5e-7
    """Peak learning rate (AdamW)."""
    beta: float = 0.1
    """Strength of the KL tie to the reference (KTO's β)."""
    loss: str = "kto"
    """Unpaired objective by name: kto or bco (docs/objectives.md)."""
    desirable_weight: float = 1.0
    """λ_D, the weight of rows labelled desirable (true)."""
    undesirable_weight: float = 1.0
    """λ_U, the weight of rows labelled undesirable (false)."""
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    """The frozen reference (reference.mode=precomputed|copy|adapter, reference.model=PATH)."""


@dataclass
class ListwiseConfig(TrainConfig):
    """Listwise preference optimisation on {prompt, responses, scores | probs | ranking} rows."""

    lr: float = 5e-7
    """Peak learning rate (AdamW)."""
    beta: float = 0.1
    """Scale β of the implicit rewards β·(log πθ − log πref) that are softmaxed over each list."""
    loss: str = "soft"
    """Listwise objective by name: soft (cross-entropy to a target distribution) or plackett_luce."""
    temperature: float = 1.0
    """soft: the target distribution of a row with `scores` is softmax(scores / temperature)."""
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    """The frozen reference (reference.mode=precomputed|copy|adapter, reference.model=PATH)."""


@dataclass
class OnlineConfig(TrainConfig):
    """Fields every online method (GRPO, RLOO, PPO) shares: prompts in, sampled completions scored by a
    reward set, clipped policy updates (docs/online_rl.md)."""

    lr: float | None = None
    """Peak learning rate (AdamW); none = scaled to the policy, 1e-6 x sqrt(7e9 / its parameters), x10 with
    LoRA: 1e-6 at 7B, 2.6e-6 at 1B, 1e-4 for the shipped 656K model (docs/online_rl.md)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    rewards: list[dict] = field(default_factory=list)
    """Reward sources, as in `alignkit score`: e.g. [{type: vader}, {type: length, weight: -0.1}]."""
    reward_normalize: bool = False
    """Normalise each source by its running mean and std before weighting (the state is checkpointed)."""
    reward_clip: float | None = None
    """Clip the total reward to [-reward_clip, reward_clip]; none = no clipping."""
    num_generations: int = 8
    """G: completions sampled per prompt."""
    batch_size: int = 8
    """Prompts per step on each process (a rollout holds batch_size x num_generations completions)."""
    max_new_tokens: int = 64
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken at the same temperature."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability (1 = all)."""
    ppo_epochs: int = 1
    """Passes over each rollout (more than 1 reuses samples, with the clipped ratio)."""
    minibatch_size: int = 0
    """Completions per optimizer step on each process (0 = the whole rollout: one step per epoch)."""
    epsilon: float = 0.2
    """Clip range of the policy ratio (1 - epsilon, 1 + epsilon_high)."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO's clip-higher, e.g. 0.28); default: epsilon."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens without an EOS out of the loss (DAPO's overlong filter)."""
    reference: ReferenceSettings = field(default_factory=lambda: ReferenceSettings(mode="copy"))
    """The frozen reference: copy (a frozen copy) or adapter (with LoRA: the base, adapter off)."""
    generation_batch_size: int = 64
    """Completions generated at once (bounds generation memory)."""
    eval_steps: int = 20
    """Score one sample per eval prompt every this many steps (and at the end)."""
    save_steps: int = 20
    """Write a checkpoint every this many steps (0 = only on interrupt)."""


@dataclass
class GRPOConfig(OnlineConfig):
    """Online RL without a critic on prompt rows: GRPO, Dr. GRPO, RLOO, REINFORCE++ (docs/online_rl.md)."""

    advantage: str = "grpo"
    """Advantage estimator: grpo, dr_grpo, rloo or reinforce_pp (docs/online_rl.md)."""
    num_generations: int = 8
    """G: completions sampled per prompt (the group each advantage is relative to)."""
    beta: float = 0.04
    """Weight of the KL penalty to the reference in the loss (0 = no reference held)."""
    kl_estimator: str = "k3"
    """Per-token estimator of KL(policy || reference): k1, k2 or k3 (Schulman 2020)."""
    kl_importance_correction: bool = False
    """Weight the KL estimate by the ratio policy / sampling policy (unbiased when samples are reused)."""
    scale_rewards: str = "group"
    """grpo: divide advantages by the group's reward std (group), the batch's (batch) or not (none)."""
    loss_aggregation: str = "auto"
    """token_mean (DAPO), sequence_mean (GRPO paper), constant (Dr. GRPO) or auto (the estimator's own)."""


@dataclass
class PPOConfig(OnlineConfig):
    """PPO with a critic and a KL-penalised reward (Ziegler et al. 2019, InstructGPT), for causal and
    encoder-decoder (T5, FLAN-T5) policies (docs/ppo.md)."""

    num_generations: int = 1
    """Completions sampled per prompt (PPO's baseline is the critic, so 1 is the usual choice)."""
    batch_size: int = 16
    """Prompts per step on each process (a rollout holds batch_size x num_generations completions)."""
    ppo_epochs: int = 4
    """Passes over each rollout, in shuffled minibatches."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty in the reward, -β·(log π_old - log π_ref) (0 = no reference held);
    the starting value when target_kl is set."""
    target_kl: float | None = None
    """Adaptive KL control (Ziegler et al. 2019): steer β so that the KL to the reference per completion
    (nats) stays near this; none = a fixed β."""
    kl_horizon: int = 10000
    """Adaptive KL: completions over which a full correction of β is spread."""
    vf_coef: float = 0.1
    """Weight of the value loss beside the policy loss."""
    cliprange_value: float = 0.2
    """Clip range of the value update around the rollout's values (0 = no clipping)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_rewards: bool = False
    """Rescale the per-token rewards of a rollout to unit std (mean kept) before GAE."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of a completion that never produced an EOS (none = no penalty)."""
    early_stop_kl: float = 0.0
    """Stop a rollout's epochs early once a minibatch's approx KL to the sampling policy exceeds this
    (0 = never)."""
    value_model: str = "policy"
    """The critic: policy (a copy of the policy's backbone, new head), adapter (with lora.enabled: a second
    LoRA adapter with its own head on the policy's shared frozen base, no copy) or a trained reward model
    (hub name or folder, e.g. `alignkit reward` output; causal policies) whose backbone and head start it."""


@dataclass
class RLOOConfig(GRPOConfig):
    """GRPOConfig with the RLOO advantage (Ahmadian et al. 2024): each completion's baseline is the mean
    reward of the other completions of its prompt."""

    advantage: str = "rloo"
    """Advantage estimator: grpo, dr_grpo, rloo or reinforce_pp (docs/online_rl.md)."""


# ---------------------------------------------------------------------------------------------------
# Ranges: checked when a config loads (and again when a run starts), so a bad value fails at once, naming
# its key. One table per config class; a class is checked against its own table and its bases'. A new
# config class adds its row: `RANGES[MyConfig] = {"field": at_least(1), ...}` (None values are skipped).


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts: an interval (either end open or closed), plus special values."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    """Values accepted outside the interval, e.g. -1 meaning "derive from epochs"."""

    def accepts(self, value) -> bool:
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and not (isinstance(value, float) and math.isnan(value))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {num(self.low)}"
        elif self.low == -math.inf:
            text = f"{'<' if self.high_open else '<='} {num(self.high)}"
        else:
            brackets = ("(" if self.low_open else "[", ")" if self.high_open else "]")
            text = f"in {brackets[0]}{num(self.low)}, {num(self.high)}{brackets[1]}"
        return text + "".join(f" or {num(v)}" for v in self.also)


def at_least(low: float, *also) -> Range:
    """value >= low (or one of `also`)."""
    return Range(low, also=also)


def above(low: float, *also) -> Range:
    """value > low (or one of `also`)."""
    return Range(low, low_open=True, also=also)


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Range:
    """low <= value <= high (either end open on request)."""
    return Range(low, high, low_open=low_open, high_open=high_open)


FRACTION = between(0, 1)


def max_length_above_prompt(cfg) -> str | None:
    """A max_prompt_length that is set must leave max_length room for a completion. (Left at its default
    with a short max_length, prompts are still cut to max_prompt_length and completions to the rest; online
    configs, which have max_new_tokens, do not use max_length.)"""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}["max_prompt_length"]
    if hasattr(cfg, "max_new_tokens") or cfg.max_prompt_length == default:
        return None
    if cfg.max_length > cfg.max_prompt_length:
        return None
    return (
        f"'max_length' ({cfg.max_length}) must be greater than 'max_prompt_length' ({cfg.max_prompt_length}), "
        "leaving room for the completion"
    )


# class -> {field: Range or a tuple of the accepted values}; RELATIONS: class -> checks across fields.
RANGES: dict[type, dict[str, Range | tuple]] = {
    LoraSettings: {"r": at_least(1), "alpha": above(0), "dropout": between(0, 1, high_open=True)},
    ReferenceSettings: {"mode": ("precomputed", "copy", "adapter")},
    TrainConfig: {
        "eval_fraction": between(0, 1, high_open=True),
        "max_steps": at_least(0, -1),
        "epochs": above(0),
        "batch_size": at_least(1),
        "grad_accum": at_least(1),
        "lr": above(0),
        "lr_scheduler": ("linear", "cosine", "constant"),
        "warmup_ratio": FRACTION,
        "weight_decay": at_least(0),
        "max_grad_norm": at_least(0),
        "max_length": at_least(1),
        "max_prompt_length": at_least(1),
        "seed": between(0, 2**32 - 1),
        "dtype": ("float32", "bfloat16", "float16", "auto"),
        "mixed_precision": MIXED_PRECISION,
        "logging_steps": at_least(1),
        "eval_steps": at_least(1),
        "save_steps": at_least(0),
        "save_total_limit": at_least(1),
        "logprob_chunk_size": at_least(1),
        "on_bad_rows": ("refuse", "skip"),
    },
    RewardConfig: {
        "backbone": ("auto", "causal", "encoder"),
        "center_rewards_coefficient": at_least(0),
        "pooling": ("auto", "mean", "cls", "last"),
        "ensemble": at_least(1),
    },
    # The objectives' own parameters (beta, label_smoothing, gamma, nll_weight, the KTO weights) and the
    # constraints are checked by their registries (losses.check_params, check_constraints) before a run starts.
    DPOConfig: {
        "stages": at_least(1),
        "mdpo_corruption": ("crop", "mask"),
        "mdpo_keep": between(0, 1, low_open=True),
    },
    ListwiseConfig: {"temperature": above(0)},
    OnlineConfig: {
        "reward_clip": above(0),
        "num_generations": at_least(1),
        "max_new_tokens": at_least(1),
        "temperature": above(0),
        "top_k": at_least(0),
        "top_p": between(0, 1, low_open=True),
        "ppo_epochs": at_least(1),
        "minibatch_size": at_least(0),
        "epsilon": above(0),
        "epsilon_high": above(0),
        "generation_batch_size": at_least(1),
    },
    GRPOConfig: {
        "advantage": ("grpo", "dr_grpo", "rloo", "reinforce_pp"),
        "beta": at_least(0),
        "scale_rewards": ("group", "batch", "none"),
    },
    PPOConfig: {
        "kl_coef": at_least(0),
        "target_kl": above(0),
        "kl_horizon": at_least(1),
        "vf_coef": above(0),
        "cliprange_value": at_least(0),
        "gamma": FRACTION,
        "lam": FRACTION,
        "early_stop_kl": at_least(0),
    },
}
RELATIONS: dict[type, list] = {TrainConfig: [max_length_above_prompt]}


def range_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Every value of `cfg` (and of its nested settings) outside its RANGES entry, as one message each."""
    problems = []
    for klass in type(cfg).__mro__:
        for name, rule in RANGES.get(klass, {}).items():
            value = getattr(cfg, name, None)
            if value is None or isinstance(value, bool):
                continue
            key = prefix + name
            if isinstance(rule, tuple):
                if value not in rule:
                    problems.append(f"'{key}' must be one of {', '.join(map(str, rule))}, got {value!r}")
            elif not rule.accepts(value):
                problems.append(f"'{key}' must be {rule}, got {value!r}")
        problems += [p for check in RELATIONS.get(klass, []) if (p := check(cfg))]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems += range_problems(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += range_problems(item, f"{prefix}{f.name}[{i}].")
    return problems


def validate(cfg: Any, where: str = "") -> Any:
    """`cfg` itself if every value is in range (see RANGES); else ConfigError listing every one that is not
    (`where` prefixes the keys, e.g. 'rewards[1]')."""
    problems = list(dict.fromkeys(range_problems(cfg, f"{where}." if where else "")))
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it, for `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/command-line value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"'{key}': expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}': expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"'{key}': expected a string, got {value!r}")
        return str(value)
    if origin is list:
        # A YAML list (e.g. `rewards: [{type: vader}, ...]`); each element is checked as its own key.
        if not isinstance(value, list):
            raise ConfigError(f"'{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping of key: value, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        # An element of a list of settings (e.g. one of `constraints: [{type: ..., weight: ...}]`).
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping of key: value, got {value!r}")
        return from_mapping(annotation, value, key)
    return value


def from_mapping(cls: type, mapping: dict, where: str = ""):
    """A `cls` dataclass built from a flat mapping, with load_config's key and type checks.

    For configs held inside a list (e.g. one reward source of `rewards: [...]`). An unknown key is
    an error naming the closest valid one and listing them all. `where` names the mapping in messages:
    'rewards[1]' gives "rewards[1]: unknown key 'lable' ..." and "'rewards[1].weight': expected ...".
    """
    cfg = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    hints = _field_types(cls)
    for key, value in mapping.items():
        key = str(key)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}unknown key '{key}' for {cls.__name__}.{hint} Valid keys: {', '.join(names)}."
            )
        setattr(cfg, key, _coerce(value, hints[key], f"{where}.{key}" if where else key))
    return validate(cfg, where)


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}.{hint} Run with --help to list the valid keys.")


def _set(cfg: Any, dotted: str, value: Any, prefix: str = "") -> None:
    """Set `dotted` (e.g. 'lora.r' or 'train.lr') on the dataclass `cfg`, validating key and type."""
    head, _, rest = dotted.partition(".")
    names = [f.name for f in dataclasses.fields(cfg)]
    if head in SECTION_ALIASES and head not in names and rest and not prefix:
        return _set(cfg, rest, value, prefix)
    if head not in names:
        valid = [prefix + n for n in names] + [
            f"{prefix}{n}.{s.name}"
            for n in names
            if dataclasses.is_dataclass(getattr(cfg, n))
            for s in dataclasses.fields(getattr(cfg, n))
        ]
        raise _unknown_key(prefix + dotted, valid, f" for {type(cfg).__name__}")
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        if rest:
            return _set(current, rest, value, prefix + head + ".")
        if not isinstance(value, dict):
            raise ConfigError(f"'{prefix}{head}' is a section: give it as a mapping or set {head}.<key>")
        for k, v in value.items():
            _set(current, str(k), v, prefix + head + ".")
        return None
    annotation = _field_types(type(cfg))[head]
    if rest and _takes_mapping(annotation):  # a free-form mapping field (e.g. a judge spec): key by key
        mapping = dict(current or {})
        inner = mapping
        *path, last = rest.split(".")
        for key in path:
            inner[key] = dict(inner.get(key) or {}) if isinstance(inner.get(key), dict | None) else {}
            inner = inner[key]
        inner[last] = value
        setattr(cfg, head, mapping)
        return None
    if rest:
        raise ConfigError(f"'{prefix}{head}' is not a section; '{prefix}{dotted}' is not a valid key")
    setattr(cfg, head, _coerce(value, annotation, prefix + head))
    return None


def _takes_mapping(annotation: Any) -> bool:
    """Whether a field's type is a dict (or a dict or None)."""
    if annotation is dict or typing.get_origin(annotation) is dict:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_mapping(a) for a in typing.get_args(annotation))
    return False


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in mapping.items():
        if isinstance(v, dict):
            items.extend(_flatten(v, f"{prefix}{k}."))
        else:
            items.append((f"{prefix}{k}", v))
    return items


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None):
    """Build a `cls` config from an optional YAML file and `key=value` overrides (later wins)."""
    cfg = cls()
    if path:
        try:
            with open(path) as f:
                data = _load_yaml(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        for key, value in _flatten(data):
            try:
                _set(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _set(cfg, key.strip(), _load_yaml(raw) if raw.strip() else "")
    return validate(cfg)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data (nested dicts)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, output_dir: str | Path) -> Path:
    """Write the resolved config to output_dir/config.yaml (and return the path)."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# resolved {type(cfg).__name__}\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def describe(cls: type) -> str:
    """Help text: every field with its type, default and docstring."""
    docs = field_docs(cls)
    lines = []
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            sub = field_docs(type(value))
            for s in dataclasses.fields(value):
                v = json.dumps(getattr(value, s.name))
                lines.append(f"  {f.name}.{s.name} = {v}\n      {sub.get(s.name, '')}")
            continue
        lines.append(f"  {f.name} = {json.dumps(value)}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
