"""Reward-hacking and collapse alarms of the online commands: rules over the history of each step's figures
(`training.alarm_stats.step_figures`), with the thresholds of the `alarms:` section (`config.alarms`).

    alarms = Alarms(cfg.alarms)
    check = alarms.update(figures)        # every step, after its updates
    record.update(check.record)           # alarm/<name> 0 or 1, alarm_stats/<name>/<figure>
    check.fired                           # {name: what the figures say}

Each rule, with W = window, S = smoothing, B = baseline_steps (docs/online_rl.md has the reasons):

    length_exploitation   over the last W steps: |mean r| ≥ length_corr, r = Pearson(length, reward) within a
                          step; the mean length moved by ≥ length_change of its mean, the way the within-step
                          slope rewards; the reward rose (trend slope s_R > 0) and mean slope x length trend
                          ≥ length_explained x s_R (length explains that much of the rise)
    entropy_collapse      mean of the last S entropies < entropy_fraction x their mean over the first B steps
    kl_runaway            mean of the last S KLs > kl_max; or, over the last W steps after the first B, with
                          thirds' means a, b, c: c ≥ kl_growth_min, b > a, c − b ≥ kl_growth·(b − a) and
                          c ≥ kl_growth·a
    repetition            distinct-2 or distinct-3 (mean of the last S) < distinct_fraction x its start, or
                          < distinct_min; or the repeated-n-gram share (last S) ≥ its start + repeat_rise
    source_disagreement   two sources' signed per-step means over the last W steps: Pearson ≤ source_corr,
                          one's trend r ≥ source_trend and the other's ≤ −source_trend; and since the start
                          (mean of the last S against the first B) the first rose and the second fell
    zero_std_groups       mean of the last S zero-std shares > zero_std_max

An alarm whose figure exists is logged 0 or 1 every step (0 while it waits for its window or baseline). The
state (the first B steps' figures, the last W, which alarms fired at the last step) is what `state_dict` saves,
so a resumed run fires exactly where the uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations

from alignkit.config.alarms import ALARMS, AlarmSettings
from alignkit.training.alarm_stats import pearson, thirds, trend


class AlarmStop(RuntimeError):
    """A run stopped by `alarms.stop_on_alarm` after step `step`, where `alarms` fired ({name: what the figures
    said}); that step was checkpointed (`checkpoint`, the folder on the main process) and the report written.
    resume=true continues it (with alarms.stop_on_alarm=false, or another threshold, to go past the alarm)."""

    def __init__(self, step: int, alarms: dict[str, str], checkpoint=None):
        listed = "; ".join(f"{name}: {why}" for name, why in alarms.items())
        where = f" (checkpoint {checkpoint})" if checkpoint is not None else ""
        super().__init__(
            f"stopped by alarms.stop_on_alarm after step {step}{where}: {listed}. The run report marks the "
            "step; to go on, resume=true with alarms.stop_on_alarm=false or another threshold (docs/online_rl.md)"
        )
        self.step, self.alarms, self.checkpoint = step, alarms, checkpoint


@dataclass
class AlarmCheck:
    """What `Alarms.update` found at one step."""

    record: dict[str, float] = field(default_factory=dict)
    """alarm/<name> (0 or 1) of every alarm the step's figures allow, and alarm_stats/<name>/<figure>."""
    fired: dict[str, str] = field(default_factory=dict)
    """The alarms firing at this step: {name: what the figures say}."""
    onsets: list[str] = field(default_factory=list)
    """The fired alarms that did not fire at the step before (what the console announces)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class Alarms:
    """The history of the per-step figures and the rules of the module docstring."""

    def __init__(self, settings: AlarmSettings):
        self.settings = settings
        self.start: list[dict[str, float]] = []
        """The figures of the first `baseline_steps` steps."""
        self.recent: list[dict[str, float]] = []
        """The figures of the last `window` steps, oldest first."""
        self.firing: list[str] = []
        """The alarms that fired at the last step."""
        self.steps = 0
        """The steps seen."""

    optional_in_checkpoint = True
    """A checkpoint written without alarms (older, or alarms.enabled=false) resumes with an empty history."""

    def state_dict(self) -> dict:
        return {"start": self.start, "recent": self.recent, "firing": self.firing, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.start = [dict(f) for f in state["start"]]
        self.recent = [dict(f) for f in state["recent"]]
        self.firing = list(state["firing"])
        self.steps = int(state["steps"])

    def update(self, figures: dict[str, float]) -> AlarmCheck:
        """Add this step's figures and return the alarms' verdicts at it."""
        s = self.settings
        self.steps += 1
        if len(self.start) < s.baseline_steps:
            self.start.append(dict(figures))
        self.recent = [*self.recent, dict(figures)][-max(s.window, s.smoothing) :]
        check = AlarmCheck()
        for name, rule in (
            ("length_exploitation", self._length),
            ("entropy_collapse", self._entropy),
            ("kl_runaway", self._kl),
            ("repetition", self._repetition),
            ("source_disagreement", self._sources),
            ("zero_std_groups", self._zero_std),
        ):
            verdict = rule(figures)
            if verdict is None:  # the figures this alarm reads are not taken in this run
                continue
            stats, why = verdict
            check.record[f"alarm/{name}"] = float(why is not None)
            check.record.update({f"alarm_stats/{name}/{k}": v for k, v in stats.items()})
            if why is not None:
                check.fired[name] = why
        check.onsets = [name for name in check.fired if name not in self.firing]
        self.firing = list(check.fired)
        return check

    # Each rule: None where its figures are not taken, else ({figure: value}, why it fires or None).

    def _series(self, key: str, rows: list[dict] | None = None) -> list[float] | None:
        """`key` at each of `rows` (default: the last `window` steps); None unless every one has it."""
        rows = self.recent[-self.settings.window :] if rows is None else rows
        values = [r[key] for r in rows if key in r]
        return values if len(values) == len(rows) else None

    def _smoothed(self, key: str) -> float | None:
        """`key`'s mean over the last `smoothing` steps, once there are that many."""
        if len(self.recent) < self.settings.smoothing:
            return None
        values = self._series(key, self.recent[-self.settings.smoothing :])
        return _mean(values) if values else None

    def _baseline(self, key: str) -> float | None:
        """`key`'s mean over the first `baseline_steps` steps, once they are all in."""
        if len(self.start) < self.settings.baseline_steps:
            return None
        values = self._series(key, self.start)
        return _mean(values) if values else None

    def _full_window(self) -> bool:
        return len(self.recent) >= self.settings.window

    def _length(self, figures: dict):
        s = self.settings
        stats = {"len_reward_corr": figures["len_reward_corr"]} if "len_reward_corr" in figures else {}
        if not self._full_window():
            return stats, None
        rows = self.recent[-s.window :]
        # A step of one length has no correlation: length explains none of its reward (r = slope = 0).
        r = _mean([row.get("len_reward_corr", 0.0) for row in rows])
        per_token = _mean([row.get("len_reward_slope", 0.0) for row in rows])
        lengths, rewards = self._series("length"), self._series("reward")
        length_slope, _ = trend(lengths)
        reward_slope, _ = trend(rewards)
        change = length_slope * (s.window - 1) / max(_mean(lengths), 1e-9)  # relative move over the window
        stats.update(corr_window=r, length_change=change)
        explained = per_token * length_slope
        if reward_slope > 0:
            stats["explained"] = explained / reward_slope
        fires = (
            abs(r) >= s.length_corr
            and abs(change) >= s.length_change
            and explained > 0  # the length moved the way the reward pays for
            and reward_slope > 0
            and explained >= s.length_explained * reward_slope
        )
        if not fires:
            return stats, None
        return stats, (
            f"within a step, Pearson(length, reward) averaged {r:+.2f} over the last {s.window} steps; the mean "
            f"length moved {change:+.0%} over them ({lengths[0]:.1f} -> {lengths[-1]:.1f} tokens), which explains "
            f"{explained / reward_slope:.0%} of the reward's rise"
        )

    def _entropy(self, figures: dict):
        if "entropy" not in figures:
            return None
        stats = {"entropy": figures["entropy"]}
        start, now = self._baseline("entropy"), self._smoothed("entropy")
        if start is None or now is None or start <= 0:
            return stats, None
        stats["ratio"] = now / start
        if now >= self.settings.entropy_fraction * start:
            return stats, None
        return stats, (
            f"mean token entropy {now:.3g} (last {self.settings.smoothing} steps) is {now / start:.0%} of its "
            f"start {start:.3g}, below alarms.entropy_fraction={self.settings.entropy_fraction:g}"
        )

    def _kl(self, figures: dict):
        if "kl" not in figures:
            return None
        s = self.settings
        stats = {"kl": figures["kl"]}
        now = self._smoothed("kl")
        if now is not None and now > s.kl_max:
            return (
                stats,
                f"KL to the reference {now:.3g} nats per token (last {s.smoothing} steps) > kl_max={s.kl_max:g}",
            )
        # Growth is read after the start: from a reference equal to the policy the KL rises from 0 about as t².
        after_start = self.steps >= s.baseline_steps + s.window
        values = self._series("kl") if after_start else None
        if values is None:
            return stats, None
        a, b, c = thirds(values)
        if b > a:
            stats["growth"] = (c - b) / (b - a)
        if c >= s.kl_growth_min and b > a and c - b >= s.kl_growth * (b - a) and c >= s.kl_growth * a:
            return stats, (
                f"KL to the reference growing super-linearly: {a:.3g} -> {b:.3g} -> {c:.3g} nats per token over "
                f"the thirds of the last {s.window} steps (the last rise {(c - b) / (b - a):.1f}x the first)"
            )
        return stats, None

    def _repetition(self, figures: dict):
        s = self.settings
        stats = {k: figures[k] for k in ("distinct_2", "distinct_3", "repeated") if k in figures}
        reasons = []
        for n in (2, 3):
            key = f"distinct_{n}"
            start, now = self._baseline(key), self._smoothed(key)
            if start is None or now is None or start <= 0:
                continue
            stats[f"ratio_{n}"] = now / start
            if now < s.distinct_fraction * start:
                reasons.append(f"distinct-{n} {now:.3f} is {now / start:.0%} of its start {start:.3f}")
            elif now < s.distinct_min:
                reasons.append(f"distinct-{n} {now:.3f} < distinct_min={s.distinct_min:g}")
        start, now = self._baseline("repeated"), self._smoothed("repeated")
        if start is not None and now is not None:
            stats["repeated_rise"] = now - start
            if now >= start + s.repeat_rise:
                reasons.append(
                    f"{now:.0%} of completions repeat a {s.repeat_ngram}-gram (last {s.smoothing} steps), "
                    f"up from {start:.0%} at the start"
                )
        return stats, ("; ".join(reasons) if reasons else None)

    def _sources(self, figures: dict):
        names = [k.removeprefix("source/") for k in figures if k.startswith("source/")]
        if len(names) < 2:
            return None
        s = self.settings
        stats, reasons = {}, []
        series = {n: self._series(f"source/{n}") if self._full_window() else None for n in names}
        for i, x in enumerate(names):
            for y in names[i + 1 :]:
                if series[x] is None or series[y] is None:
                    continue
                corr = pearson(series[x], series[y])
                if corr is None:
                    continue
                stats[f"corr/{x}/{y}"] = corr
                trends = {n: trend(series[n])[1] for n in (x, y)}
                # Since the start, too: the one gained above its start, the other below (noise over one window
                # can look like anything; a source that still rose overall was not given up).
                levels = {n: (self._smoothed(f"source/{n}"), self._baseline(f"source/{n}")) for n in (x, y)}
                if any(v is None for pair in levels.values() for v in pair):
                    continue
                moved = {n: now - start for n, (now, start) in levels.items()}
                for up, down in permutations((x, y)):
                    if (
                        corr <= s.source_corr
                        and trends[up] >= s.source_trend
                        and trends[down] <= -s.source_trend
                        and moved[up] > 0 > moved[down]
                    ):
                        reasons.append(
                            f"{up} rises while {down} falls (their per-step means, signed by weight, correlate "
                            f"{corr:+.2f} over the last {s.window} steps; trend r {trends[up]:+.2f} and "
                            f"{trends[down]:+.2f})"
                        )
        return stats, ("; ".join(reasons) if reasons else None)

    def _zero_std(self, figures: dict):
        if "zero_std" not in figures:
            return None
        now = self._smoothed("zero_std")
        stats = {"share": now} if now is not None else {}
        if now is None or now <= self.settings.zero_std_max:
            return stats, None
        return stats, (
            f"{now:.0%} of groups gave every completion the same reward (last {self.settings.smoothing} steps), "
            f"> zero_std_max={self.settings.zero_std_max:g}"
        )


def describe(name: str) -> str:
    """What alarm `name` means and what to do, in one line (`config.alarms.ALARMS`)."""
    meaning, action = ALARMS[name]
    return f"{meaning}; {action}"
