"""Reward-hacking and collapse alarms of the online commands: rules over the history of each step's figures
(`training.alarm_stats.step_figures`), with the thresholds of the `alarms:` section (`config.alarms`).

    alarms = Alarms(cfg.alarms)
    check = alarms.update(figures)        # every step, after its updates
    record.update(check.record)           # alarm/<name> 0 or 1, alarm_stats/<name>/<figure>
    check.fired                           # {name: what the figures say}

Each rule, with W = window, S = smoothing, B = baseline_steps (docs/online_rl.md has the reasons):

    length_exploitation   over the last W steps: the mean length moved by ≥ length_change (its trend line's
                          move s_L x (W − 1) over the line's value at the window's start); within a step the reward pays for that direction, |r| ≥
                          length_corr and |r|·sqrt(n − 2) ≥ length_z, r the within-step Pearson(length,
                          reward) pooled over the window's n completions (`pooled_within`, slope b per token);
                          and the reward did not rise (trend s_R ≤ 0) or
                          the length explains ≥ length_explained of its rise: b·s_L ≥ length_explained·s_R.
                          The same with the return (the reward less β·KL) where the command gives one
    length_drift          mean of the last S lengths outside [1 / length_ratio, length_ratio] x their mean over
                          the first B steps (length_ratio 0: off)
    entropy_collapse      mean of the last S entropies < entropy_fraction x their mean over the first B steps
    kl_runaway            median of the last S KLs > kl_max; or, over the last W steps after the first B, with
                          thirds' means a, b, c: c ≥ kl_growth_min, b > a, c − b ≥ kl_growth·(b − a),
                          c ≥ kl_growth·a, and c − a at least kl_growth_z standard errors (`rise_z`)
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

import math
import statistics
from dataclasses import dataclass, field
from itertools import permutations

from alignkit.config.alarms import ALARMS, AlarmSettings
from alignkit.training.alarm_stats import pearson, pooled_within, rise_z, thirds, trend


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


SIGNALS = {
    "reward": "the reward",
    "return": "the return the update maximises (the reward less β·KL, with a length penalty)",
}
"""What the length alarm correlates length with: the reward, and where the command gives it, the return."""


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
            ("length_drift", self._length_drift),
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

    def _smoothed(self, key: str, middle: bool = False) -> float | None:
        """`key`'s mean (middle: median) over the last `smoothing` steps, once there are that many."""
        if len(self.recent) < self.settings.smoothing:
            return None
        values = self._series(key, self.recent[-self.settings.smoothing :])
        if not values:
            return None
        return statistics.median(values) if middle else _mean(values)

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
        stats = {k: figures[k] for k in ("len_reward_corr", "len_return_corr") if k in figures}
        if not self._full_window():
            return stats, None
        rows = self.recent[-s.window :]
        lengths = self._series("length")
        if lengths is None:  # (a step without one: a NaN left out)
            return stats, None
        length_slope, _ = trend(lengths)
        moved = length_slope * (s.window - 1)  # tokens over the window, by its trend line
        change = moved / max(_mean(lengths) - moved / 2, 1e-9)  # ... relative to where the line starts
        stats["length_change"] = change
        reasons = []
        for signal, what in SIGNALS.items():
            if any(f"len_{signal}_cov" not in r for r in rows):
                continue
            parts = [
                (r[f"{signal}_n"], r[f"{signal}_len_var"], r[f"{signal}_var"], r[f"len_{signal}_cov"])
                for r in rows
            ]
            r, per_token = pooled_within(parts)
            if r is None:
                continue
            means = self._series(signal)
            if means is None:
                continue
            signal_slope, _ = trend(means)
            worth = per_token * length_slope  # what the length's move earns a step, at the within-step slope
            stats[f"corr_{signal}"] = r
            if signal_slope > 0:
                stats[f"explained_{signal}"] = worth / signal_slope
            z = abs(r) * math.sqrt(max(sum(n for n, *_ in parts) - 2, 0))  # its standard errors from 0
            stats[f"z_{signal}"] = z
            # The signal pays for the move: r has its sign, is large enough and clear of noise.
            paid = r * change > 0 and abs(r) >= s.length_corr and z >= s.length_z
            if not (abs(change) >= s.length_change and paid):
                continue
            if signal_slope > 0 and worth < s.length_explained * signal_slope:
                continue  # it rose mostly for other reasons: length is a side effect
            if signal_slope <= 0:
                gain = "while it did not rise"
            elif worth >= signal_slope:
                gain = "worth more than all of its rise (something else fell)"
            else:
                gain = f"which explains {worth / signal_slope:.0%} of its rise"
            reasons.append(
                f"within a step, {what} correlates {r:+.2f} with length (pooled over the last {s.window} steps), and "
                f"the mean length moved {change:+.0%} over them ({lengths[0]:.1f} -> {lengths[-1]:.1f} tokens), the "
                f"way it pays, {gain}"
            )
        return stats, ("; ".join(reasons) if reasons else None)

    def _length_drift(self, figures: dict):
        s = self.settings
        if not s.length_ratio:  # off
            return None
        start, now = self._baseline("length"), self._smoothed("length")
        if start is None or now is None or start <= 0:
            return {}, None
        ratio = now / start
        if 1 / s.length_ratio <= ratio <= s.length_ratio:
            return {"ratio": ratio}, None
        return {"ratio": ratio}, (
            f"the mean completion length {now:.1f} tokens (last {s.smoothing} steps) is {ratio:.0%} of its start "
            f"{start:.1f}, outside 1/{s.length_ratio:g}x-{s.length_ratio:g}x"
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
        # the median: one step's KL can be 100x its neighbours' (a completion through a token the reference
        # all but rules out; measured 11.5 among 0.05s), which is not a runaway
        now = self._smoothed("kl", middle=True)
        if now is not None and now > s.kl_max:
            return (
                stats,
                f"KL to the reference {now:.3g} nats per token (median of the last {s.smoothing} steps) > "
                f"kl_max={s.kl_max:g}",
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
            # a noisy KL (single steps 10x their neighbours are common) makes such thirds by chance: the rise
            # must also stand out of the steps' own spread
            z = rise_z(values)
            stats["growth_z"] = min(z, 1e6)
            if z >= s.kl_growth_z:
                return stats, (
                    f"KL to the reference growing super-linearly: {a:.3g} -> {b:.3g} -> {c:.3g} nats per token "
                    f"over the thirds of the last {s.window} steps (the last rise {(c - b) / (b - a):.1f}x the "
                    f"first, the whole rise {z:.1f} standard errors)"
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
