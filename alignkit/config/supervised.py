"""The configs of the commands that fit a given target: sft (the completions), reward (a Bradley–Terry
model of the pairs' labels), offline-rl (the logged responses, weighted by their rewards) and distill (an
aligned teacher's next-token distributions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from alignkit.config.base import LoraSettings, ReferenceSettings, TrainConfig
from alignkit.config.generation import (
    SAMPLING_MOVED,
    GenerationSettings,
    backend_is_not,
    temperature_above_zero,
)
from alignkit.config.load import above, at_least, between

AWR_BASELINES = ("mean", "prompt", "none")
"""What offline-rl's AWR subtracts from a row's reward (alignkit.losses.weighted.advantages)."""
DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd")
"""distill's divergences (alignkit.losses.distill.DIVERGENCES holds each one's fixed β)."""


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
class OfflineRLConfig(TrainConfig):
    """Offline RL on logged {prompt, response, reward} rows (docs/offline_rl.md)."""

    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    method: str = "awr"
    """awr (advantage-weighted fine-tuning: weights exp(A/τ), clipped, self-normalised) or raft (fine-tune
    on the top `top_fraction` rows by reward)."""
    baseline: str = "mean"
    """awr: b in A = r − b: mean (over the training rows), prompt (the prompt's mean reward where it has
    several responses, else the overall mean) or none."""
    temperature: float = 1.0
    """awr: τ in exp(A/τ); small τ weights the best rows most, τ -> ∞ is plain SFT."""
    max_weight: float = 20.0
    """awr: exp(A/τ) is clipped at this before the weights are normalised to mean 1 (AWR's clip)."""
    top_fraction: float = 0.25
    """raft: the fraction of rows kept, ceil(top_fraction·n) of each group of n (at least 1)."""
    rank_within: str = "prompt"
    """raft: rank rows within their prompt's responses (prompt) or over all rows (all)."""
    kl_coef: float = 0.0
    """β of the penalty β·KL(π ‖ π_ref) per token of the logged responses (0 = none, no reference held)."""
    reference: ReferenceSettings = field(default_factory=lambda: ReferenceSettings(mode="copy"))
    """The frozen reference of the KL penalty: copy (a frozen copy) or adapter (with LoRA: the base)."""

    ranges: ClassVar[dict] = {
        "method": ("awr", "raft"),
        "baseline": AWR_BASELINES,
        "temperature": above(0),
        "max_weight": above(0),
        "top_fraction": between(0, 1, low_open=True),
        "rank_within": ("prompt", "all"),
        "kl_coef": at_least(0),
    }


@dataclass
class DistillConfig(TrainConfig):
    """Distil an aligned teacher into a student on prompt rows (GKD; docs/distillation.md)."""

    teacher: str = ""
    """The aligned teacher: a hub name or local folder; must share the student's vocabulary."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    batch_size: int = 8
    """Prompts per step on each process (cut into `grad_accum` micro-batches)."""
    divergence: str = "jsd"
    """forward_kl (KL(teacher ‖ student)), reverse_kl (KL(student ‖ teacher)) or jsd (generalised JSD(β))."""
    beta: float = 0.5
    """jsd: β of JSD(β) = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M), M = β·P + (1 − β)·Q (P teacher, Q student)."""
    distill_temperature: float = 1.0
    """τ: both distributions are softmax(logits / τ) in the divergence (no τ² factor)."""
    student_fraction: float = 0.5
    """λ: the probability that a step trains on student samples (on-policy) rather than teacher samples."""
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=48))
    """How the completions are sampled, the teacher's and the student's alike (generation.temperature above
    0; the loop or hf backend: vLLM would need two engines, one per model)."""
    eval_steps: int = 20
    """Evaluate the divergence on the held-out prompts every this many steps (and at the end)."""
    save_steps: int = 20
    """Write a checkpoint every this many steps (0 = only on interrupt)."""

    ranges: ClassVar[dict] = {
        "divergence": DIVERGENCE_NAMES,
        "beta": between(0, 1),
        "distill_temperature": above(0),
        "student_fraction": between(0, 1),
    }
    relations: ClassVar[tuple] = (
        temperature_above_zero("the student learns the teacher's distribution on sampled completions"),
        backend_is_not(
            "vllm",
            "distill samples from two models, the teacher and the student, which would need two engines",
        ),
    )
    moved: ClassVar[dict] = {**SAMPLING_MOVED, "generation_batch_size": "generation.batch_size"}
