"""The configs of the online commands, which score the policy's own samples while it trains: grpo (and
its family: Dr. GRPO, REINFORCE++), rloo, ppo and online-dpo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from alignkit.config.alarms import AlarmSettings
from alignkit.config.base import ReferenceSettings, TrainConfig
from alignkit.config.generation import SAMPLING_MOVED, GenerationSettings, temperature_above_zero
from alignkit.config.grpo_family import GRPO_FAMILY_RELATIONS
from alignkit.config.guide import GuideSettings, guide_relations, guide_traces_relations
from alignkit.config.load import FRACTION, above, at_least, between
from alignkit.config.preference import GAP_USES

SAMPLER_CORRECTIONS = ("auto", "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""`sampler_correction`'s values: auto, none, and the modes `losses.off_policy.SAMPLER_WEIGHTINGS` computes."""
POLICY_LOSS_NAMES = ("grpo", "gspo", "cispo")
"""`policy_loss`'s values: the keys of `losses.policy_losses.POLICY_LOSSES`."""


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
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """How rollouts are sampled. The policy's log-probs are taken at generation.temperature (which must be
    above 0) and renormalised over the top_k / top_p kept set; the reference's at the same temperature,
    untruncated (docs/online_rl.md)."""
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
    sampler_correction: str = "auto"
    """Weight each token's policy loss by w = π_old / π_sampler when the sampler is not the trainer (vLLM's
    kernels and precision): token_truncate (per token, min(w, C)), token_mask (per token, 0 where w > C),
    sequence_truncate / sequence_mask (one w per completion, the product of its tokens'), none, or auto:
    sequence_mask when the rollout carries log-probs from a sampler that is not the trainer, else none
    (docs/online_rl.md)."""
    sampler_correction_cap: float = 3.0
    """C, the cap of the sampler correction's weights (truncated to it or masked above it)."""
    reference: ReferenceSettings = field(default_factory=lambda: ReferenceSettings(mode="copy"))
    """The frozen reference: copy (a frozen copy) or adapter (with LoRA: the base, adapter off)."""
    eval_steps: int = 20
    """Score one sample per eval prompt every this many steps (and at the end)."""
    save_steps: int = 20
    """Write a checkpoint every this many steps (0 = only on interrupt)."""
    alarms: AlarmSettings = field(default_factory=AlarmSettings)
    """Reward-hacking and collapse alarms, logged every step; alarms.stop_on_alarm stops the run at one
    (docs/online_rl.md, *Reward-hacking and collapse alarms*)."""

    ranges: ClassVar[dict] = {
        "reward_clip": above(0),
        "num_generations": at_least(1),
        "ppo_epochs": at_least(1),
        "minibatch_size": at_least(0),
        "sampler_correction": SAMPLER_CORRECTIONS,
        "sampler_correction_cap": above(0),
        "epsilon": above(0),
        "epsilon_high": above(0),
    }
    relations: ClassVar[tuple] = (
        temperature_above_zero("online training scores its samples under the tempered distribution"),
    )
    moved: ClassVar[dict] = {**SAMPLING_MOVED, "generation_batch_size": "generation.batch_size"}


@dataclass
class GRPOConfig(OnlineConfig):
    """Online RL without a critic on prompt rows: GRPO, Dr. GRPO, RLOO, REINFORCE++ (docs/online_rl.md)."""

    advantage: str = "grpo"
    """Advantage estimator: grpo, dr_grpo, rloo or reinforce_pp (docs/online_rl.md)."""
    policy_loss: str = "grpo"
    """The policy term: grpo (PPO's clipped surrogate per token), gspo (one length-normalised ratio per
    completion, clipped per completion; Zheng et al. 2025) or cispo (each token's REINFORCE term weighted
    by its clipped, detached ratio; MiniMax-M1). gspo and cispo equal grpo at one update per rollout
    (docs/online_rl.md)."""
    num_generations: int = 8
    """G: completions sampled per prompt (the group each advantage is relative to)."""
    epsilon: float | None = None
    """Clip range of the policy ratio (1 - epsilon, 1 + epsilon_high); none = the policy loss's: 0.2 for
    grpo, 3e-4 for gspo, 1.0 for cispo (no lower bound)."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO's clip-higher, e.g. 0.28); none = the policy loss's: epsilon for grpo, 4e-4
    for gspo, 5.0 for cispo."""
    beta: float | None = None
    """Weight of the KL penalty to the reference, in the loss or the reward (0 = no reference held); none =
    the policy loss's: 0.04 for grpo, 0 for gspo and cispo."""
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
    """token_mean (DAPO), sequence_mean (GRPO paper), constant (Dr. GRPO) or auto: sequence_mean for
    policy_loss=gspo, token_mean for cispo, and with grpo the estimator's own."""
    guide: GuideSettings = field(default_factory=GuideSettings)
    """A frozen guide policy steering the rollouts (mixture) or writing k of each group's completions (traces),
    the update corrected or shaped for it (off unless guide.model is set; docs/online_rl.md, *Guided
    rollouts*)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose G rewards are all equal (they carry no policy gradient)
    and draw more prompts, from the seeded order, until the step has batch_size groups (docs/online_rl.md)."""
    dynamic_sampling_max_rollouts: int = 3
    """Dynamic sampling: the most extra rollouts (batch_size prompts x G each, per process) a step draws; when
    they are spent, the step trains on the groups kept, topped up with dropped ones."""
    overlong_cache: int = 0
    """DAPO's soft overlong punishment: a reward falling from 0 to -1 over the last overlong_cache tokens of
    generation.max_new_tokens, added before the advantages (0 = off)."""
    overlong_weight: float = 1.0
    """Weight of the overlong punishment (with overlong_cache > 0)."""
    multi_reward: str = "sum"
    """How several rewards make the advantage: sum (the weighted sum, then the advantage estimator) or
    normalize_then_sum (GDPO: each source z-scored within its group, the weighted sum z-scored over the
    batch)."""
    top_entropy_fraction: float | None = None
    """Train the policy loss on the top fraction of the step's completion tokens by the sampling policy's
    entropy only (0.2 in Wang et al. 2025, "Beyond the 80/20 rule"); none = every token."""

    ranges: ClassVar[dict] = {
        "advantage": ("grpo", "dr_grpo", "rloo", "reinforce_pp"),
        "policy_loss": POLICY_LOSS_NAMES,
        "beta": at_least(0),
        "scale_rewards": ("group", "batch", "none"),
        "dynamic_sampling_max_rollouts": at_least(1),
        "overlong_cache": at_least(0),
        "overlong_weight": above(0),
        "multi_reward": ("sum", "normalize_then_sum"),
        "top_entropy_fraction": between(0, 1, low_open=True, high_open=True),
    }
    relations: ClassVar[tuple] = (guide_relations, guide_traces_relations, *GRPO_FAMILY_RELATIONS)


@dataclass
class RLOOConfig(GRPOConfig):
    """GRPOConfig with the RLOO advantage (Ahmadian et al. 2024): each completion's baseline is the mean
    reward of the other completions of its prompt."""

    advantage: str = "rloo"
    """Advantage estimator: grpo, dr_grpo, rloo or reinforce_pp (docs/online_rl.md)."""


def no_guide_traces(cfg) -> str | None:
    """PPO's `relations` check: guide.mode=traces needs groups of completions."""
    if cfg.guide.model and cfg.guide.mode == "traces":
        return (
            "guide.mode=traces puts guide completions into each prompt's group of G; PPO samples one completion "
            "per prompt and baselines it with its critic, so there is no group to put them in: use grpo or "
            "rloo, or guide.mode=mixture"
        )
    return None


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
    vf_lr: float | None = None
    """The critic's learning rate (none = 10 x lr, as verl's defaults; OpenRLHF's examples use ~18x): a critic
    at the policy's rate stays unfitted for hundreds of steps and PPO barely moves (docs/ppo.md, *Why PPO
    barely moved*). With an lr of 1e-3 or more, choose it yourself: 10x may be too fast for the critic."""
    critic_warmup: int = 0
    """Steps at the start in which only the critic learns (the policy's learning rate is 0), so that the first
    policy updates get advantages from a fitted critic (verl's critic_warmup, OpenRLHF's freezing_actor_steps)."""
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
    guide: GuideSettings = field(default_factory=GuideSettings)
    """A frozen guide policy steering the rollouts (guide.mode=mixture; off unless guide.model is set;
    docs/online_rl.md, *Guided rollouts*)."""

    ranges: ClassVar[dict] = {
        "kl_coef": at_least(0),
        "target_kl": above(0),
        "kl_horizon": at_least(1),
        "vf_coef": above(0),
        "vf_lr": above(0),
        "critic_warmup": at_least(0),
        "cliprange_value": at_least(0),
        "gamma": FRACTION,
        "lam": FRACTION,
        "early_stop_kl": at_least(0),
    }
    relations: ClassVar[tuple] = (guide_relations, no_guide_traces)


@dataclass
class OnlineDPOConfig(OnlineConfig):
    """Online DPO: each step's pairs are the current policy's own samples, judged by a reward set or a
    pairwise LLM judge (docs/iterative.md)."""

    num_generations: int = 2
    """Completions sampled per prompt; the best and the worst make its pair (Guo et al.: 2)."""
    beta: float = 0.1
    """Strength of the KL tie to the reference (DPO's β); for orpo, λ (docs/objectives.md)."""
    loss: str = "sigmoid"
    """Paired objective by name, as for `alignkit dpo`: sigmoid, ipo, hinge, robust, simpo, ..."""
    label_smoothing: float = 0.0
    """Conservative DPO (sigmoid) / robust DPO (robust): probability ε in [0, 0.5) a label is flipped."""
    gamma: float = 0.5
    """SimPO's target reward margin γ."""
    nll_weight: float = 1.0
    """Weight α of the per-token NLL on the chosen completion that cpo and rpo add."""
    judge: dict | None = None
    """A pairwise LLM judge ({type: judge, template: pairwise, backend: ...}) ranking each prompt's
    completions by a round robin instead of `rewards` (which then only score the eval prompts)."""
    min_gap: float = 0.0
    """A prompt's pair is trained on when its score gap exceeds this; ties are never pairs."""
    gap_as: str = "none"
    """none, margin (the gap as the sigmoid loss's margin) or soft_label (σ(gap / soft_label_temperature)
    as the preference probability); both need loss=sigmoid."""
    soft_label_temperature: float = 1.0
    """gap_as=soft_label: the temperature of σ(gap / temperature)."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """How each step's completions are sampled (generation.temperature above 0). Log-probs are the policy's
    and the reference's own, at temperature 1 and untruncated (as iterative-dpo's and TRL's): the sampling
    settings only shape which completions become pairs."""
    lr: float | None = 5e-7
    """Peak learning rate (AdamW); none = scaled to the policy as for grpo (docs/online_rl.md)."""

    ranges: ClassVar[dict] = {
        "num_generations": at_least(2),
        "beta": above(0),
        "soft_label_temperature": above(0),
        "gap_as": GAP_USES,
    }
