"""The configs of the preference commands: dpo (and its family, stepwise DPO, mDPO, constraints), kto,
listwise, iterative-dpo (rounds of sampling, pairing and DPO) and diffusion-dpo (image pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from alignkit.config.base import LoraSettings, ReferenceSettings, TrainConfig
from alignkit.config.generation import SAMPLING_MOVED, GenerationSettings, temperature_above_zero
from alignkit.config.load import above, at_least, between, from_mapping

PAIR_STRATEGIES = ("best_worst", "all")
"""How scored samples become pairs (alignkit.data.pairs.build_pairs): each prompt's best against its worst,
or every pair whose gap is large enough."""
GAP_USES = ("none", "margin", "soft_label")
"""What a pair's score gap becomes in the sigmoid loss (alignkit.data.pairs.pair_columns)."""
DIFFUSION_LOSS_NAMES = ("sigmoid", "ipo")
"""diffusion-dpo's objectives (alignkit.losses.diffusion.DIFFUSION_LOSSES holds their functions)."""
UNET_ATTENTION = "to_k,to_q,to_v,to_out.0"
"""The UNet's attention projections: diffusion-dpo's default LoRA targets."""


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
class PreferenceConfig(TrainConfig):
    """What the offline preference commands (dpo, kto, listwise) share: a learning rate for a policy that
    starts close to its optimum, an objective by name with its strength β, and the frozen reference the
    objective measures the policy against. Each command's own config says what its β and objectives are."""

    lr: float = 5e-7
    """Peak learning rate (AdamW)."""
    beta: float = 0.1
    """Strength of the KL tie to the reference (β; docs/objectives.md)."""
    loss: str = "sigmoid"
    """The objective by name, from the command's loss registry (docs/objectives.md)."""
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    """The frozen reference (reference.mode=precomputed|copy|adapter, reference.model=PATH)."""

    # No ranges for beta and the objectives' own parameters (label_smoothing, gamma, nll_weight, the KTO
    # weights): their registries check them against the objective chosen (losses.check_params), before a
    # run starts.


@dataclass
class DPOConfig(PreferenceConfig):
    """Offline preference optimisation (DPO and its family) on preference pairs."""

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

    # The constraints are checked by their registry (check_constraints) before a run starts.
    ranges: ClassVar[dict] = {
        "stages": at_least(1),
        "mdpo_corruption": ("crop", "mask"),
        "mdpo_keep": between(0, 1, low_open=True),
    }

    def __post_init__(self) -> None:
        # Constraints given as plain dicts from Python get the same key and type checks as from YAML.
        self.constraints = [
            from_mapping(ConstraintSettings, c, f"constraints[{i}]") if isinstance(c, dict) else c
            for i, c in enumerate(self.constraints)
        ]


@dataclass
class KTOConfig(PreferenceConfig):
    """Unpaired preference optimisation (KTO, BCO) on {prompt, completion, label} rows."""

    beta: float = 0.1
    """Strength of the KL tie to the reference (KTO's β)."""
    loss: str = "kto"
    """Unpaired objective by name: kto or bco (docs/objectives.md)."""
    desirable_weight: float = 1.0
    """λ_D, the weight of rows labelled desirable (true)."""
    undesirable_weight: float = 1.0
    """λ_U, the weight of rows labelled undesirable (false)."""


@dataclass
class ListwiseConfig(PreferenceConfig):
    """Listwise preference optimisation on {prompt, responses, scores | probs | ranking} rows."""

    beta: float = 0.1
    """Scale β of the implicit rewards β·(log πθ − log πref) that are softmaxed over each list."""
    loss: str = "soft"
    """Listwise objective by name: soft (cross-entropy to a target distribution) or plackett_luce."""
    temperature: float = 1.0
    """soft: the target distribution of a row with `scores` is softmax(scores / temperature)."""

    ranges: ClassVar[dict] = {"temperature": above(0)}


@dataclass
class IterativeDPOConfig(DPOConfig):
    """Rejection-sampling / iterative DPO: rounds of sampling the policy, scoring, pairing and DPO
    (docs/iterative.md). `data` holds prompt rows; every DPO setting applies to each round's training."""

    data: str = ""
    """Prompt rows ({"prompt": ...} or chat messages), a .jsonl/.json/.parquet file or dataset name."""
    rounds: int = 2
    """Rounds of sample -> score -> pair -> train."""
    prompts_per_round: int = 0
    """Prompts sampled in each round: consecutive slices of one seeded shuffle, so rounds see new prompts
    until they run out (0 = every prompt, every round)."""
    num_generations: int = 4
    """k: completions sampled per prompt."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """How each round's completions are sampled (generation.temperature above 0). Each round's DPO scores
    the policy and the reference at temperature 1, untruncated, as online-dpo does: the sampling settings
    only shape which completions become pairs."""
    rewards: list[dict] = field(default_factory=list)
    """Reward sources scoring each completion, as in `alignkit score`; also score the eval prompts."""
    judge: dict | None = None
    """A pairwise LLM judge ({type: judge, template: pairwise, backend: ...}) ranking each prompt's
    completions by a round robin (each one's mean win probability) instead of `rewards`."""
    pairs: str = "best_worst"
    """best_worst (each prompt's best against its worst completion) or all (every pair whose gap exceeds
    min_gap: RS-DPO)."""
    min_gap: float = 0.0
    """A pair is kept when its score gap exceeds this (RS-DPO's threshold η); ties are never pairs."""
    max_pairs_per_prompt: int = 0
    """pairs=all: at most this many pairs per prompt, the largest gaps (0 = all)."""
    gap_as: str = "none"
    """none, margin (the gap as the sigmoid loss's margin) or soft_label (σ(gap / soft_label_temperature)
    as the pair's preference probability); both need loss=sigmoid."""
    soft_label_temperature: float = 1.0
    """gap_as=soft_label: the temperature of σ(gap / temperature)."""
    update_reference: bool = True
    """Each round is measured against its starting policy (iterative DPO); false: against `model` (or
    `reference.model`) in every round."""

    ranges: ClassVar[dict] = {
        "rounds": at_least(1),
        "prompts_per_round": at_least(0),
        "num_generations": at_least(2),
        "max_pairs_per_prompt": at_least(0),
        "soft_label_temperature": above(0),
        "pairs": PAIR_STRATEGIES,
        "gap_as": GAP_USES,
    }
    relations: ClassVar[tuple] = (temperature_above_zero("a pair needs two different completions"),)
    moved: ClassVar[dict] = {**SAMPLING_MOVED, "generation_batch_size": "generation.batch_size"}


@dataclass
class DiffusionDPOConfig(TrainConfig):
    """Diffusion-DPO on image preference pairs (docs/diffusion_dpo.md)."""

    model: str = ""
    """Pipeline: a hub name or local folder in the Stable Diffusion 1.x/2.x layout (unet/, vae/,
    text_encoder/, tokenizer/, scheduler/) or SDXL's (plus text_encoder_2/, tokenizer_2/)."""
    data: str = ""
    """Pairs: rows {prompt, chosen_image, rejected_image} or Pick-a-Pic {caption, jpg_0, jpg_1, label_0}
    (.jsonl/.json/.parquet or a dataset name)."""
    beta: float = 5000.0
    """β in L = −log σ(−β/2·Δ), the paper's convention (the diffusers script's beta_dpo = β/2)."""
    loss: str = "sigmoid"
    """sigmoid (Diffusion-DPO) or ipo (the IPO-style squared loss on the same margin)."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    resolution: int = 512
    """Images are resized (shorter side) and centre-cropped to resolution x resolution pixels."""
    cache_latents: bool = False
    """Encode every image with the VAE once before training and keep the latents in memory (fastest over
    several epochs; costs 4·(resolution/8)² floats per image)."""
    vae_batch_size: int = 8
    """Images encoded by the VAE at once when caching latents."""
    lora: LoraSettings = field(
        default_factory=lambda: LoraSettings(
            enabled=True, r=8, alpha=8, dropout=0.0, target_modules=UNET_ATTENTION
        )
    )
    """LoRA on the UNet's attention projections (lora.enabled=false trains the whole UNet, against a
    frozen copy)."""

    ranges: ClassVar[dict] = {
        "beta": above(0),
        "loss": DIFFUSION_LOSS_NAMES,
        "resolution": at_least(8),
        "vae_batch_size": at_least(1),
    }
