"""`alignkit score`: score (prompt, response) rows with a set of reward sources.

    alignkit score examples/rewards.yaml data=examples/responses.jsonl output=scored.jsonl

writes every input row with a `score_<name>` column per source, `reward` (the composed total), a
`violated_<name>` flag per constraint cost and a `fallback_<name>` flag per judge (the row got its fallback), then prints per-source statistics (mean, std, quantiles)
and writes them, with the resolved config and the sources' counters, to `<output>.summary.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from alignkit.config.load import ConfigError, validate
from alignkit.config.tools import ScoreConfig
from alignkit.data.chat import json_type
from alignkit.data.prompts import missing_columns
from alignkit.data.readers import DataError, Problems, encoding_problems, line_ranges, read_records
from alignkit.io import append_jsonl, atomic_path, atomic_write
from alignkit.rewards.base import row_context
from alignkit.rewards.compose import RewardSet
from alignkit.rewards.registry import parse_spec

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summary_path(output: str | Path) -> Path:
    """Where the summary of `output` goes: beside it, `.summary.json` for its suffix (scored.jsonl ->
    scored.summary.json)."""
    output = Path(output)
    return output.with_name(output.stem + ".summary.json")


def read_pairs(cfg: ScoreConfig) -> tuple[list[dict], list[str], list[str]]:
    """(records, prompts, responses); every bad row is reported at once as file:line: field: problem."""
    rows = [r for _, r in read_scored_rows(cfg)]
    return rows, [r[cfg.prompt_field] for r in rows], [r[cfg.response_field] for r in rows]


def read_scored_rows(cfg: ScoreConfig) -> list[tuple[int, dict]]:
    """The (line, record) pairs of `cfg.data`, validated: every bad row reported at once as file:line: field:
    problem; warnings for empty and repeated responses."""
    problems = Problems(cfg.data)
    records = read_records(cfg.data, cfg.data_split, problems)
    for line, record in records:
        for key in (cfg.prompt_field, cfg.response_field):
            value = record.get(key)
            if value is None:
                problems.add(line, key, f"missing (expected a string; found keys {sorted(record)})")
            elif not isinstance(value, str):
                problems.add(line, key, f"found {json_type(value)} (expected a string)")
            else:
                for field, reason in encoding_problems(value, key):
                    problems.add(line, field, reason)
    problems.raise_if_any()
    if not records:
        raise DataError("no rows to score (the source is empty)", cfg.data)
    empty = [n for n, r in records if not r[cfg.response_field].strip()]
    if empty:
        print(
            f"warning: {len(empty)} rows have an empty '{cfg.response_field}' ({cfg.data}:{line_ranges(empty)})"
        )
    seen: dict[tuple[str, str], int] = {}
    repeats = [n for n, r in records if seen.setdefault((r[cfg.prompt_field], r[cfg.response_field]), n) != n]
    if repeats:
        print(
            f"warning: {len(repeats)} rows repeat an earlier row's prompt and response ({cfg.data}:{line_ranges(repeats)})"
        )
    return records


def check_columns(cfg: ScoreConfig, records: list[tuple[int, dict]], columns: tuple[str, ...]) -> None:
    """A DataError naming file:line for every row that lacks one of `columns` (what the sources read)."""
    problems = Problems(cfg.data)
    for line, record in records:
        for name, reason in missing_columns(record, columns):
            problems.add(line, name, reason)
    problems.raise_if_any()


def row_columns(cfg: ScoreConfig, record: dict) -> dict:
    """A row's columns as the reward sources read them: every key but the prompt and the response."""
    return {k: v for k, v in record.items() if k not in (cfg.prompt_field, cfg.response_field)}


def summarize(values: torch.Tensor) -> dict[str, float]:
    """count, mean, std (population), min, the QUANTILES (as p05 ... p95) and max of a (N,) tensor, over its
    scored values: NaNs (a source's no opinion) are left out and counted as `unscored` when there are any."""
    x = values.double()
    unscored = int(x.isnan().sum())
    x = x[~x.isnan()]
    if x.numel() == 0:
        stats = ["mean", "std", "min", *(f"p{round(q * 100):02d}" for q in QUANTILES), "max"]
        return {"count": 0, "unscored": unscored, **dict.fromkeys(stats, math.nan)}
    out = {"count": x.numel(), "mean": float(x.mean()), "std": float(x.std(unbiased=False))}
    if unscored:
        out["unscored"] = unscored
    out["min"] = float(x.min())
    for q, v in zip(QUANTILES, torch.quantile(x, torch.tensor(QUANTILES, dtype=x.dtype)).tolist()):
        out[f"p{round(q * 100):02d}"] = v
    out["max"] = float(x.max())
    return out


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one line per source (and the total), one column per statistic."""
    stats = ["mean", "std", "min", *(f"p{round(q * 100):02d}" for q in QUANTILES), "max"]
    width = max(len(name) for name in summary) + 2
    lines = [f"{'source':<{width}}" + "".join(f"{s:>9}" for s in stats)]
    for name, values in summary.items():
        lines.append(f"{name:<{width}}" + "".join(f"{values[s]:>+9.3f}" for s in stats))
    return "\n".join(lines)


def _json_number(x: float) -> float | None:
    """A float32 score as a short JSON number (7 significant digits, its precision); NaN -> null."""
    return float(f"{x:.7g}") if math.isfinite(x) else None


def run(cfg: ScoreConfig) -> dict:
    """Scores `cfg.data` with `cfg.rewards`, writes `cfg.output` and its summary; returns the summary."""
    _check_before_reading(cfg)
    records = read_scored_rows(cfg)  # bad rows fail before any model is loaded
    reward_set = RewardSet.from_specs(cfg.rewards, cfg.normalize, cfg.clip)
    check_columns(cfg, records, reward_set.columns)
    rows = [r for _, r in records]
    prompts, responses = [r[cfg.prompt_field] for r in rows], [r[cfg.response_field] for r in rows]
    context = row_context(
        [row_columns(cfg, r) for r in rows], origins=[f"{cfg.data}:{n}" for n, _ in records]
    )
    scores, fallbacks = _score_in_batches(
        reward_set, prompts, responses, context, batch_size=cfg.batch_size, progress=cfg.progress
    )
    # Composed over all rows at once, so that normalisation uses the statistics of the whole file.
    out = reward_set.compose(scores)
    output = Path(cfg.output)
    _write_scored_rows(output, rows, scores=scores, composed=out, fallbacks=fallbacks)

    summary = {name: summarize(values) for name, values in scores.items()}
    summary["reward"] = summarize(out.total)
    counters = {
        s.name: {k: float(v) for k, v in s.metrics().items()} for s in reward_set.sources if s.metrics()
    }
    violations = {
        name: {"threshold": reward_set.cost_thresholds[name], "violation_rate": float(flags.float().mean())}
        for name, flags in out.violated.items()
    }
    print(f"scored {len(rows)} rows of {cfg.data} -> {output}\n")
    print(format_summary(summary))
    for name, v in violations.items():
        print(f"\ncost {name}: {v['violation_rate']:.1%} of rows over the threshold {v['threshold']:g}")
    for name, counts in counters.items():
        print(f"\n{name}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items())))
        if counts.get("fallbacks"):
            errors = counts.get("fallbacks_error", 0)
            print(
                f"  warning: {counts['fallbacks']:g} of {len(rows)} rows got the fallback score "
                f"({counts['fallbacks'] - errors:g} without a valid score, {errors:g} after judge errors); "
                f"they are marked fallback_{name}: true in {output}"
            )
    report = {
        "rows": len(rows),
        "sources": summary,
        "costs": violations,
        "counters": counters,
        "config": asdict(cfg),
    }
    summary_file = summary_path(output)
    atomic_write(summary_file, json.dumps(report, indent=2) + "\n")
    print(f"\nsummary written to {summary_file}")
    return report


def _check_before_reading(cfg: ScoreConfig) -> None:
    """ConfigError for what is wrong before any data is read: no sources, no data or output, a value out of
    range, an output that exists (without overwrite), a source spec that does not parse."""
    if not cfg.rewards:
        raise ConfigError(
            "no reward sources: set 'rewards' to a list of {type: ...} mappings in the YAML file"
        )
    if not cfg.data or not cfg.output:
        raise ConfigError("set data=<rows to score> and output=<scored .jsonl>")
    validate(cfg)
    existing = [str(p) for p in (Path(cfg.output), summary_path(cfg.output)) if p.exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: set overwrite=true "
            "to replace, or choose another output"
        )
    for i, spec in enumerate(cfg.rewards):
        parse_spec(spec, f"rewards[{i}]")  # cheap: a typo in the config fails before the data is read


def _score_in_batches(
    reward_set: RewardSet, prompts: list, responses: list, context=None, *, batch_size: int, progress: bool
) -> tuple[dict, dict]:
    """({source: (N,) scores}, {judge: [whether each row got its fallback score]}): every source's scores of
    the rows, `batch_size` rows at a time (with a progress bar when asked and there are several batches);
    `context` (`rewards.base.row_context`) holds the rows' other columns, for the sources that read them."""
    starts = range(0, len(prompts), batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="scoring", unit="batch")
    batches, fallbacks = [], {}
    for i in starts:
        part = None if context is None else context.rows(i, i + batch_size)
        batches.append(
            reward_set.score_sources(prompts[i : i + batch_size], responses[i : i + batch_size], part)
        )
        for source in reward_set.sources:  # judges say which rows got their fallback score
            if hasattr(source, "last_fallbacks"):
                fallbacks.setdefault(source.name, []).extend(source.last_fallbacks)
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}, fallbacks


def _write_scored_rows(output: Path, rows: list, *, scores: dict, composed, fallbacks: dict) -> None:
    """`output`: every row with its `score_<source>` columns, `reward` (the `composed` total), a
    `violated_<cost>` and a `fallback_<judge>` flag per cost and judge; written whole or not at all."""
    # a crash never leaves a half-written output behind
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            scored = dict(row)
            for name, values in scores.items():
                scored[f"score_{name}"] = _json_number(float(values[i]))
            scored["reward"] = _json_number(float(composed.total[i]))
            for name, flags in composed.violated.items():
                scored[f"violated_{name}"] = bool(flags[i])
            for name, flags in fallbacks.items():
                scored[f"fallback_{name}"] = flags[i]
            append_jsonl(f, scored)
