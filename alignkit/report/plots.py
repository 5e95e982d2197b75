"""The report's figures, drawn with matplotlib's Agg renderer (no display needed) into PNG bytes.

matplotlib is an optional extra (`pip install 'alignkit[report]'`); `available()` says whether it is there
and the report leaves the figures out, with that message, when it is not.
"""

from __future__ import annotations

import io
import math

WIDTH, HEIGHT, DPI = 480, 300, 100
"""Every curve is a WIDTH x HEIGHT pixel PNG (the browser test checks this size)."""
ALARM_COLOR = "crimson"
"""The marks of a single run's alarms on its curves."""
MISSING = "plots need matplotlib: pip install 'alignkit[report]' (or pip install matplotlib)"


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _axes():
    """A figure drawn on its own Agg canvas. Not pyplot: no global backend is switched or figure kept,
    so a training run inside a notebook leaves the notebook's plotting alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # Fixed margins, not tight_layout: that would measure every tick label, half the cost of a figure.
    fig.subplots_adjust(left=0.14, right=0.97, top=0.9, bottom=0.15)
    return fig, ax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def curve(title: str, lines: list[dict], marks: list[dict] | None = None) -> bytes:
    """One metric against the optimizer step as a WIDTH x HEIGHT PNG.

    lines: one per run and split, {"label", "steps", "values", "color": index, "eval": bool}; train values
    are solid lines, eval values dashed with dots, so several runs and both splits share one set of axes.
    Non-finite values (a NaN loss) are left out of the line. marks: {"step", "label", "color": index or None}
    each, a dotted vertical line at the step in the run's colour (None: ALARM_COLOR) with its label at the top
    (where an alarm fired).
    """
    from matplotlib import rcParams
    from matplotlib.ticker import MaxNLocator

    fig, ax = _axes()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for line in lines:
        points = [(s, v) for s, v in zip(line["steps"], line["values"]) if math.isfinite(v)]
        if not points:
            continue
        xs, ys = zip(*points)
        style = {"linestyle": "--", "marker": "o", "markersize": 3} if line["eval"] else {"linewidth": 1.4}
        if len(xs) == 1:
            style = {**style, "marker": "o", "markersize": 4}
        ax.plot(xs, ys, color=colors[line["color"] % len(colors)], label=line["label"], **style)
    for mark in marks or ():
        color = ALARM_COLOR if mark["color"] is None else colors[mark["color"] % len(colors)]
        ax.axvline(mark["step"], color=color, linestyle=":", linewidth=1.2)
        ax.annotate(
            f"{mark['label']} @{mark['step']}", (mark["step"], 1), xycoords=("data", "axes fraction"),
            xytext=(2, -2), textcoords="offset points", rotation=90, va="top", fontsize=6, color=color,
        )  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def before_after(title: str, sources: list[str], base: list[tuple], aligned: list[tuple]) -> bytes:
    """Mean reward of the base and the aligned model per reward source, with ±1 s.e. bars, as a WIDTH x
    HEIGHT PNG. base / aligned: (mean, stderr or None) per source."""
    fig, ax = _axes()
    xs = range(len(sources))
    for offset, name, values in ((-0.2, "base", base), (0.2, "aligned", aligned)):
        means = [m for m, _ in values]
        errors = [e or 0.0 for _, e in values]
        ax.bar([x + offset for x in xs], means, width=0.35, yerr=errors, capsize=3, label=name)
    ax.set_xticks(list(xs), sources, fontsize=8)
    pad = 0.5 / len(sources)  # one source: two bars, not two wide slabs
    ax.set_xlim(-0.5 - pad, len(sources) - 0.5 + pad)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def frontier(
    title: str,
    xs: list[float],
    ys: list[float],
    labels: list[str],
    *,
    on_front: list[bool],
    axis_labels: tuple[str, str],
    errors: tuple[list[float | None], list[float | None]] | None = None,
) -> bytes:
    """A sweep's points as a scatter (±1 s.e. bars when given), each labelled, the Pareto-optimal ones
    joined by a line in x order, as a WIDTH x HEIGHT PNG."""
    fig, ax = _axes()
    x_err, y_err = errors or ([None] * len(xs), [None] * len(ys))
    named = set()
    for x, y, xe, ye, label, front in zip(xs, ys, x_err, y_err, labels, on_front):
        kind = "Pareto-optimal" if front else "dominated"
        ax.errorbar(
            x, y, xerr=xe, yerr=ye, fmt="o", color="C1" if front else "C0", capsize=2, markersize=5,
            label=None if kind in named else kind,
        )  # fmt: skip
        named.add(kind)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted((x, y) for x, y, f in zip(xs, ys, on_front) if f)
    if len(front) > 1:
        ax.plot(*zip(*front), color="C1", linewidth=1.2)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(axis_labels[0], fontsize=8)
    ax.set_ylabel(axis_labels[1], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)
