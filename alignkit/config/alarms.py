"""The `alarms:` section of the online commands (grpo, rloo, ppo, online-dpo): reward-hacking and collapse alarms
computed every step from what the rollout already holds, logged as `alarm/<name>` (0 or 1) with their figures
under `alarm_stats/<name>/`, drawn in the run report, and optionally stopping the run (docs/online_rl.md,
*Reward-hacking and collapse alarms*).

    alignkit grpo ... alarms.stop_on_alarm=true alarms.entropy_fraction=0.1

The maths and the rules are in `alignkit.training.alarms`; this module holds the settings, what each alarm
means (`ALARMS`, read by the console message and the report) and the check that refuses a threshold for an alarm
the run cannot raise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from alignkit.config.load import FRACTION, ConfigError, above, at_least, between

ALARMS = {
    "length_exploitation": (
        "the reward pays for length and the policy is moving its length that way",
        "read samples at both ends of the length range; add a length term, or fix the reward model's length bias",
    ),
    "length_drift": (
        "the mean completion length moved far from its start (by default, halved or doubled)",
        "read samples; if the task does not ask for it, see whether the reward pays for it (length_exploitation's "
        "figures), whether a per-token KL penalty makes short replies cheap, and the EOS fraction; runs that "
        "should grow their length (reasoning RL) set alarms.length_ratio=0",
    ),
    "entropy_collapse": (
        "the policy's mean token entropy fell far below its start",
        "lower the learning rate, raise the KL weight or epsilon_high (clip-higher), or add an entropy bonus",
    ),
    "kl_runaway": (
        "the KL to the reference is above its bound or growing faster than linearly",
        "raise the KL weight (beta / kl_coef) or set target_kl, lower the learning rate",
    ),
    "repetition": (
        "the completions' distinct n-grams collapsed, or more of them repeat an n-gram",
        "read the samples: the policy may loop or write one answer to every prompt; raise the temperature or "
        "the KL weight",
    ),
    "source_disagreement": (
        "two reward sources move apart: one is gained at the other's expense",
        "check which source the policy games; reweigh the sources or constrain the one that falls",
    ),
    "zero_std_groups": (
        "most groups got the same reward for every completion: they carry no learning signal",
        "make the prompts harder or easier, raise num_generations, or use a finer-grained reward",
    ),
}
"""Every alarm: (what firing means, what to do)."""


@dataclass
class AlarmSettings:
    """Reward-hacking and collapse alarms, computed every step from the rollout (docs/online_rl.md)."""

    enabled: bool = True
    """Compute the alarms every step and log them (alarm/<name> 0 or 1, figures under alarm_stats/); they only
    log unless stop_on_alarm."""
    stop_on_alarm: bool = False
    """Stop the run after a step where an alarm fires: that step is finished and checkpointed, the report
    written, and the run raises AlarmStop (the CLI exits with status 3); resume=true continues it."""
    baseline_steps: int = 5
    """The run's start: the level alarms (length drift, entropy, distinct-n, repeats, the reward sources) compare
    to the mean of the first this many steps."""
    window: int = 20
    """Steps over which trends are measured (length, reward, KL growth, reward sources); an alarm that reads a
    trend waits for a full window. Shorter windows react sooner and mistake noise for trends more often."""
    smoothing: int = 3
    """Level alarms compare the mean of the last this many steps, so one noisy step never fires."""
    length_corr: float = 0.1
    """length_exploitation: |Pearson(length, reward)| within a step, pooled over the window, at least this, with
    the sign of the length's move (the reward pays for it) ..."""
    length_z: float = 3.0
    """length_exploitation: ... and at least this many standard errors from 0, |r|·sqrt(n − 2) over the window's
    n completions, so that a correlation of a few noisy steps never fires."""
    length_change: float = 0.1
    """length_exploitation: the mean completion length moved by at least this fraction over the window (its trend
    line, from the window's start)."""
    length_explained: float = 0.5
    """length_exploitation: where the reward rose, the length's move explains at least this share of the rise
    (within-step reward per token x length trend / reward trend); where it did not rise, any share."""
    length_ratio: float = 2.0
    """length_drift: the mean completion length (smoothed) below 1/this or above this times its start (0 = off, e.g.
    for reasoning RL, whose completions are meant to grow)."""
    entropy_fraction: float = 0.2
    """entropy_collapse: the mean token entropy (smoothed) below this fraction of its start."""
    kl_max: float = 0.5
    """kl_runaway: the KL to the reference (smoothed; nats per completion token, k1 under the sampling
    policy) above this."""
    kl_growth: float = 2.0
    """kl_runaway: or growing super-linearly: over the window (read after the first baseline_steps, where the KL
    rises from 0), its rise over the last third at least this many times its rise over the first third, and its
    level at least this many times the first third's."""
    kl_growth_min: float = 0.05
    """kl_runaway: super-linear growth counts only above this KL (nats per token), so that noise around a
    negligible KL never fires."""
    kl_growth_z: float = 3.0
    """kl_runaway: and only where the last third's mean is at least this many standard errors above the first
    third's (each third's spread as its noise), so that a few noisy steps do not make a healthy KL 'grow'."""
    distinct_fraction: float = 0.5
    """repetition: distinct-2 or distinct-3 of the step's completions (smoothed) below this fraction of its
    start."""
    distinct_min: float = 0.1
    """repetition: or below this absolute floor."""
    repeat_ngram: int = 4
    """repetition: n of the repeated n-gram: a completion holding some n-gram of tokens twice counts as
    repeating."""
    repeat_rise: float = 0.3
    """repetition: or the share of completions that repeat an n-gram (smoothed) rose this much above its start."""
    source_corr: float = -0.5
    """source_disagreement: two reward sources' per-step means (signed by their weights) correlated at most
    this over the window ..."""
    source_trend: float = 0.5
    """source_disagreement: ... while one rises and the other falls, each one's correlation with the step
    number at least this in size (and since the start, the one above its start, the other below)."""
    zero_std_max: float = 0.8
    """zero_std_groups: the share of groups whose completions all got the same reward (smoothed) above this
    (groups of num_generations > 1 only)."""

    ranges: ClassVar[dict] = {
        "baseline_steps": at_least(1),
        "window": at_least(3),
        "smoothing": at_least(1),
        "length_corr": between(0, 1),
        "length_z": at_least(0),
        "length_change": at_least(0),
        "length_explained": at_least(0),
        "length_ratio": above(1, 0),
        "entropy_fraction": FRACTION,
        "kl_max": above(0),
        "kl_growth": above(1),
        "kl_growth_min": at_least(0),
        "kl_growth_z": at_least(0),
        "distinct_fraction": FRACTION,
        "distinct_min": FRACTION,
        "repeat_ngram": at_least(1),
        "repeat_rise": between(0, 1),
        "source_corr": between(-1, 1),
        "source_trend": between(0, 1),
        "zero_std_max": FRACTION,
    }

    def check(self) -> str | None:
        """The section's own contradictions, or None."""
        if not self.enabled:
            changed = [
                f.name for f in fields(self) if f.name != "enabled" and getattr(self, f.name) != f.default
            ]
            if changed:
                return (
                    f"alarms.{changed[0]}={getattr(self, changed[0])} has no effect with alarms.enabled=false; "
                    "remove it or enable the alarms"
                )
        if self.smoothing > self.window:
            return f"alarms.smoothing={self.smoothing} must not exceed alarms.window={self.window}"
        return None

    relations: ClassVar[tuple] = (lambda a: a.check(),)


ALARM_SETTINGS = {
    "kl_runaway": ("kl_max", "kl_growth", "kl_growth_min", "kl_growth_z"),
    "source_disagreement": ("source_corr", "source_trend"),
    "zero_std_groups": ("zero_std_max",),
}
"""The settings of the alarms a run may be unable to raise (`check_alarm_settings`)."""


def check_alarm_settings(alarms: AlarmSettings, *, no_kl: str | None, groups: bool, sources: int) -> None:
    """Refuse (ConfigError) a threshold changed from its default for an alarm this run cannot raise: kl_runaway
    without a KL figure (`no_kl`: why there is none, or None where there is one), source_disagreement with fewer than 2 reward
    sources, zero_std_groups without groups (`groups`: num_generations > 1)."""
    why = {
        "kl_runaway": no_kl,
        "source_disagreement": None
        if sources >= 2
        else f"it compares 2 or more reward sources, got {sources}",
        "zero_std_groups": None if groups else "it reads groups of num_generations > 1 completions",
    }
    default = AlarmSettings()
    for alarm, names in ALARM_SETTINGS.items():
        for name in names:
            if why[alarm] and getattr(alarms, name) != getattr(default, name):
                raise ConfigError(
                    f"alarms.{name}={getattr(alarms, name)} has no effect: the {alarm} alarm cannot fire in this "
                    f"run ({why[alarm]}); remove it"
                )
