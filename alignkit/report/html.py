"""The report page as one HTML string: inline CSS, figures inlined as base64 PNGs, every value escaped.

Only markup lives here; what to show is decided in alignkit.report.build.
"""

from __future__ import annotations

import base64
import html
from collections import Counter

from alignkit.report import plots

MAX_DROPPED_SHOWN = 50

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d2330; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #dde; }
h3 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid #d5d9e2; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; border: 1px solid #e3e6ee; line-height: 0; }
.notes { background: #fff6dd; border: 1px solid #ecd58a; padding: 6px 12px; margin: 10px 0; }
pre { background: #f7f8fb; border: 1px solid #e3e6ee; padding: 8px; font-size: 12px; overflow-x: auto; }
.muted { color: #667; } td.text { max-width: 420px; white-space: pre-wrap; }
"""


def esc(value) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value))


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), cls: str = "") -> str:
    """A table; columns in `numeric` are right-aligned, the others wrap (`text` class)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"num" if i in numeric else "text"}">{esc(c)}</td>' for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def image(title: str, png: bytes) -> str:
    """A figure with the PNG inlined (data: URI) at its natural size; the plot carries its own title."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{plots.WIDTH}" height="{plots.HEIGHT}" '
        f'alt="{esc(title)}" title="{esc(title)}"></figure>'
    )


def num(value, spec: str = "+.3f") -> str:
    """A number formatted with `spec`, or n/a."""
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return "n/a"


def eval_section(name: str, report: dict) -> str:
    """Before/after tables of a compare_policies report (alignkit eval / demo): rewards, fluency and KL,
    samples side by side."""
    parts = []
    models, s = report.get("models") or {}, report.get("settings") or {}
    if models:
        parts.append(
            f"<p>base <code>{esc(models.get('base'))}</code>, aligned <code>{esc(models.get('aligned'))}</code></p>"
        )
    if s:
        parts.append(
            f"<p class='muted'>{esc(s.get('num_prompts'))} prompts x {esc(s.get('num_samples'))} samples per "
            f"policy, the same seeds for both (seed {esc(s.get('seed'))}); {esc(s.get('max_new_tokens'))} new "
            f"tokens, temperature {esc(s.get('temperature'))}.</p>"
        )
    parts += [_eval_rewards(report), _eval_fluency(report), _eval_samples(report)]
    parts = [part for part in parts if part]
    return f"<h3>{esc(name)}</h3>" + "".join(parts) if parts else ""


def _eval_rewards(report: dict) -> str:
    """The rewards table: each source's (and the total's) base and aligned means, their difference, the
    change and the win rate; "" when the report has none."""
    rewards = dict(report.get("rewards") or {})
    if "total" in report:
        rewards["total"] = report["total"]
    rows = []
    for source, r in rewards.items():
        b, a = r.get("base", {}), r.get("aligned", {})
        change = r.get("percent_change")
        rows.append(
            [
                source,
                f"{num(b.get('mean'))} ± {num(b.get('stderr'), '.3f')}",
                f"{num(a.get('mean'))} ± {num(a.get('stderr'), '.3f')}",
                f"{num(r.get('difference'))} ± {num(r.get('difference_stderr'), '.3f')}",
                "n/a" if change is None else f"{num(change, '+.1f')}%",
                num(r.get("win_rate"), ".3f"),
            ]
        )
    if not rows:
        return ""
    header = [
        "source",
        "base mean ± s.e.",
        "aligned mean ± s.e.",
        "difference ± paired s.e.",
        "change",
        "win rate",
    ]
    return "<h3>Rewards before and after</h3>" + table(header, rows, numeric={1, 2, 3, 4, 5}, cls="rewards")


def _eval_fluency(report: dict) -> str:
    """The fluency and KL table: each side's base-model perplexity, length and EOS fraction, and the KL;
    "" without both sides."""
    base, aligned, kl = report.get("base") or {}, report.get("aligned") or {}, report.get("kl") or {}
    if not (base and aligned):
        return ""
    fluency = [
        [label, num(base.get(key), spec), num(aligned.get(key), spec)]
        for label, key, spec in (
            ("base-model perplexity", "base_model_perplexity", ".2f"),
            ("mean completion tokens", "mean_tokens", ".1f"),
            ("EOS fraction", "eos_fraction", ".3f"),
        )
    ]
    if kl:
        fluency.append(
            [
                "KL(aligned ‖ base), nats per sequence",
                "",
                f"{num(kl.get('mean'), '.4f')} ± {num(kl.get('stderr'), '.4f')}",
            ]
        )
    return "<h3>Fluency and KL</h3>" + table(["", "base", "aligned"], fluency, numeric={1, 2})


def _eval_samples(report: dict) -> str:
    """The samples side by side, with their scores; "" when the report has none."""
    examples = report.get("examples") or []
    if not examples:
        return ""
    rows = []
    for k, ex in enumerate(examples, 1):
        scored = {
            side: ", ".join(f"{src} {num(v)}" for src, v in (ex.get(f"{side}_scores") or {}).items())
            for side in ("base", "aligned")
        }
        rows.append(
            [
                k,
                ex.get("prompt", ""),
                ex.get("base", ""),
                scored["base"],
                ex.get("aligned", ""),
                scored["aligned"],
            ]
        )
    header = ["#", "prompt", "base", "base score", "aligned", "aligned score"]
    return "<h3>Samples</h3>" + table(header, rows, {0}, "samples")


def data_section(run) -> str:
    """Rows used, truncated and dropped (data_stats.json), and the dropped rows with why (dropped_rows.jsonl)."""
    parts = []
    stats = run.data_stats or {}
    splits = [(k, v) for k, v in stats.items() if isinstance(v, dict)]
    if splits:
        keys = list(dict.fromkeys(k for _, v in splits for k in v))
        parts.append(
            table(
                ["split", *keys],
                [[name, *(v.get(k, "") for k in keys)] for name, v in splits],
                set(range(1, len(keys) + 1)),
            )
        )
    others = [(k, v) for k, v in stats.items() if not isinstance(v, dict)]
    if others:
        parts.append(table(["", "value"], others, {1}))
    if run.dropped:
        why = Counter(str(r.get("reason", "?")) for r in run.dropped)
        parts.append(f"<p>{len(run.dropped)} rows dropped (dropped_rows.jsonl):</p>")
        parts.append(table(["why", "rows"], why.most_common(), {1}, "dropped-why"))
        shown = run.dropped[:MAX_DROPPED_SHOWN]
        parts.append(
            table(
                ["file", "line", "why"],
                [[r.get("source", ""), r.get("line", ""), r.get("reason", "")] for r in shown],
                {1},
                "dropped",
            )
        )
        if len(run.dropped) > len(shown):
            parts.append(
                f"<p class='muted'>... and {len(run.dropped) - len(shown)} more in dropped_rows.jsonl</p>"
            )
    return "".join(parts)


def page(runs, *, summaries, curves, charts, differences, notes, alarms=()) -> str:
    """The whole report page.

    runs: alignkit.report.build.Run objects; summaries: one {column: text} per run; curves / charts: (title, file
    name, PNG bytes) of the training curves and of the before/after charts; differences: (config key,
    value per run); notes: what could not be read; alarms: [run, alarm, steps, figures, meaning] rows of the
    alarms that fired (online runs)."""
    title = "alignkit report: " + ", ".join(run.name for run in runs)
    body = [f"<h1>{esc(title)}</h1>", f"<p class='muted'>{esc(', '.join(str(run.path) for run in runs))}</p>"]
    if notes:
        body.append(
            "<div class='notes'><b>Notes</b><ul>"
            + "".join(f"<li>{esc(n)}</li>" for n in notes)
            + "</ul></div>"
        )
    columns = list(dict.fromkeys(k for s in summaries for k in s))
    body.append("<h2>Summary</h2>")
    body.append(
        table(
            columns,
            [[s.get(c, "-") for c in columns] for s in summaries],
            set(range(2, len(columns))),
            "summary",
        )
    )
    if alarms:
        body.append(
            "<h2>Alarms</h2><p class='muted'>Reward-hacking and collapse alarms that fired (docs/online_rl.md); "
            "each is marked on the training curves at the step it began.</p>"
        )
        header = ["run", "alarm", "steps fired", "figures at the first step", "what it means, what to do"]
        rows = [list(row) for row in alarms] if len(runs) > 1 else [list(row[1:]) for row in alarms]
        body.append(table(header if len(runs) > 1 else header[1:], rows, cls="alarms"))
    if curves:
        body.append(
            "<h2>Training curves</h2><p class='muted'>solid: train; dashed with dots: eval; x: optimizer step.</p>"
        )
        body.append("<div class='grid curves'>" + "".join(image(t, png) for t, _, png in curves) + "</div>")
    evals = [(run, name, report) for run in runs for name, report in run.evals.items()]
    if evals:
        body.append("<h2>Before and after</h2>")
        if charts:
            body.append("<div class='grid'>" + "".join(image(t, png) for t, _, png in charts) + "</div>")
        for run, name, report in evals:
            body.append(eval_section(f"{run.name}: {name}" if len(runs) > 1 else name, report))
    data = [(run, data_section(run)) for run in runs]
    if any(text for _, text in data):
        body.append("<h2>Data</h2>")
        body += [(f"<h3>{esc(run.name)}</h3>" if len(runs) > 1 else "") + text for run, text in data if text]
    if differences:
        body.append("<h2>Settings that differ</h2>")
        body.append(
            table(["key", *(run.name for run in runs)], [[k, *v] for k, v in differences], cls="differences")
        )
    configs = [run for run in runs if run.config_text]
    if configs:
        body.append("<h2>Resolved config</h2>")
        for run in configs:
            summary_line = f"{run.name}/config.yaml"
            body.append(
                f"<details{' open' if len(runs) == 1 else ''}><summary>{esc(summary_line)}</summary><pre>{esc(run.config_text)}</pre></details>"
            )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
