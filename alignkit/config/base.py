"""The configs of alignkit's commands, as dataclasses with a one-line docstring under every field (what
`alignkit <command> --help` shows), and their value ranges. Reading YAML and overrides, coercion, range
checks and `--help` text are alignkit.config.load's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from alignkit.config.load import FRACTION, above, at_least, between, from_mapping

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


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

    ranges: ClassVar[dict] = {"r": at_least(1), "alpha": above(0), "dropout": between(0, 1, high_open=True)}


@dataclass
class ReferenceSettings:
    """The frozen reference model that a KL-regularised objective measures the policy against."""

    mode: str = "precomputed"
    """precomputed (its log-probs computed once before training, no model held), copy (a frozen copy
    in memory) or adapter (with lora.enabled: the base model with the adapter switched off)."""
    model: str | None = None
    """Reference weights when different from `model` (precomputed / copy); default: the policy's start."""

    ranges: ClassVar[dict] = {"mode": ("precomputed", "copy", "adapter")}


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
    """Maximum prompt tokens; prompts are truncated from the left, keeping the end and the BOS (commands
    that sample from prompt rows refuse a longer conversational prompt at its row instead)."""
    system_prompt: str | None = None
    """Conversational rows: a system message put first in every conversation without one (rows with their
    own keep theirs), rendered by the chat template; an error on rows that are all text."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Conversational rows: extra variables for the chat template, e.g. {enable_thinking: false} (Qwen3),
    passed to every apply_chat_template call; an error on rows that are all text or without a template."""
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

    ranges: ClassVar[dict] = {
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
    }
    relations: ClassVar[tuple] = (max_length_above_prompt,)


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

    ranges: ClassVar[dict] = {
        "backbone": ("auto", "causal", "encoder"),
        "center_rewards_coefficient": at_least(0),
        "pooling": ("auto", "mean", "cls", "last"),
        "ensemble": at_least(1),
    }


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

    # The objectives' own parameters (beta, label_smoothing, gamma, nll_weight, the KTO weights) and the
    # constraints are checked by their registries (losses.check_params, check_constraints) before a run starts.
    ranges: ClassVar[dict] = {
        "stages": at_least(1),
        "mdpo_corruption": ("crop", "mask"),
        "mdpo_keep": between(0, 1, low_open=True),
    }


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

    ranges: ClassVar[dict] = {"temperature": above(0)}


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
    """Normalise each source by its running mean and std over every process before weighting (the state is
    checkpointed); eval lines report the raw weighted sum."""
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
    """Sample among the k most likely tokens only (0 = all); the policy's log-probs are renormalised over
    the same kept set, the reference's are not (docs/online_rl.md)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability (1 = all); log-probs as
    for top_k."""
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

    ranges: ClassVar[dict] = {
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
    }


@dataclass
class GRPOConfig(OnlineConfig):
    """Online RL without a critic on prompt rows: GRPO, Dr. GRPO, RLOO, REINFORCE++ (docs/online_rl.md)."""

    advantage: str = "grpo"
    """Advantage estimator: grpo, dr_grpo, rloo or reinforce_pp (docs/online_rl.md)."""
    num_generations: int = 8
    """G: completions sampled per prompt (the group each advantage is relative to)."""
    beta: float = 0.04
    """Weight of the KL penalty to the reference, in the loss or the reward (0 = no reference held)."""
    kl_in_reward: bool | None = None
    """Subtract beta x each completion's summed k1 KL from its reward before the advantages (true) or add
    beta x KL to the loss (false); none = the estimator's recipe: rloo in the reward (Ahmadian et al.
    2024, TRL), reinforce_pp in the reward at num_generations=1 and in the loss above (OpenRLHF's
    REINFORCE++-baseline), grpo and dr_grpo in the loss."""
    kl_estimator: str = "auto"
    """Per-token estimator of KL(policy || reference): k1, k2 or k3 (Schulman 2020), or auto: k1 in the
    reward; in the loss k2 for reinforce_pp (OpenRLHF's recipe) and k3 otherwise (GRPO)."""
    kl_importance_correction: bool = False
    """Importance-correct the KL term by the ratio policy / sampling policy, so that its expected gradient is
    that of KL(policy || reference) on reused samples and, for k3, on-policy too (DeepSeek-V3.2's unbiased
    KL estimate; TRL's use_bias_correction_kl)."""
    scale_rewards: str = "group"
    """grpo: divide advantages by the group's reward std (group), the batch's (batch) or not (none)."""
    loss_aggregation: str = "auto"
    """token_mean (DAPO), sequence_mean (GRPO paper), constant (Dr. GRPO) or auto (the estimator's own)."""

    ranges: ClassVar[dict] = {
        "advantage": ("grpo", "dr_grpo", "rloo", "reinforce_pp"),
        "beta": at_least(0),
        "scale_rewards": ("group", "batch", "none"),
    }


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
    """Adaptive KL: completions over which a full correction of β is spread (with target_kl only)."""
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

    ranges: ClassVar[dict] = {
        "kl_coef": at_least(0),
        "target_kl": above(0),
        "kl_horizon": at_least(1),
        "vf_coef": above(0),
        "cliprange_value": at_least(0),
        "gamma": FRACTION,
        "lam": FRACTION,
        "early_stop_kl": at_least(0),
    }


@dataclass
class RLOOConfig(GRPOConfig):
    """GRPOConfig with the RLOO advantage (Ahmadian et al. 2024): each completion's baseline is the mean
    reward of the other completions of its prompt."""

    advantage: str = "rloo"
    """Advantage estimator: grpo, dr_grpo, rloo or reinforce_pp (docs/online_rl.md)."""
