"""From a config to tokenised train/eval examples: read, validate, split, tokenise once (cached)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from alignkit.data.checks import duplicate_rows, unknown_text_rows
from alignkit.data.load import (
    load_listwise_rows,
    load_logged_rows,
    load_preference_rows,
    load_sft_rows,
    load_unpaired_rows,
)
from alignkit.data.readers import DroppedRow
from alignkit.data.tokenize import (
    cached,
    fingerprint,
    source_fingerprint,
    tokenize_listwise_rows,
    tokenize_preference_rows,
    tokenize_sft_rows,
    tokenizer_fingerprint,
)
from alignkit.io import atomic_write


def cache_dir(cfg) -> Path:
    """The run's cache folder (tokenised data, reference log-probs)."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"


def split_eval(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of rows for evaluation, the rest for training."""
    if fraction <= 0:
        return rows, []
    if not 0 < fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(round(fraction * len(rows))))
    eval_idx = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [rows[i] for i in sorted(eval_idx)]


def bad_rows_list(cfg) -> list[DroppedRow] | None:
    """The list bad rows are collected in with on_bad_rows=skip (the loaders' `skipped`); None to refuse."""
    return [] if cfg.on_bad_rows == "skip" else None


def report_dropped(cfg, dropped: list[DroppedRow], log=print) -> None:
    """List every row left out of the run in the log and in output_dir/dropped_rows.jsonl (one JSON object
    per row: source, line, reason), and say how many."""
    if not dropped:
        return
    path = Path(cfg.output_dir) / "dropped_rows.jsonl"
    atomic_write(path, "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in dropped))
    listed = "\n  ".join(str(d) for d in dropped)
    log(f"{len(dropped)} rows left out of the run (listed in {path}):\n  {listed}")


def prepare_cached(
    cfg, tokenizer, load_rows, tokenize_rows, *, kind: str, log=print
) -> tuple[list[dict], list[dict]]:
    key = fingerprint(
        kind,
        source_fingerprint(cfg.data),
        cfg.data_split,
        source_fingerprint(cfg.eval_data) if cfg.eval_data else None,
        cfg.eval_split,
        cfg.eval_fraction,
        cfg.seed,
        tokenizer_fingerprint(tokenizer),
        cfg.max_length,
        cfg.max_prompt_length,
        cfg.on_bad_rows,
        cfg.system_prompt,
        cfg.chat_template_kwargs,
    )
    template = {"system_prompt": cfg.system_prompt, "chat_template_kwargs": cfg.chat_template_kwargs}

    def build() -> dict:
        skipped = bad_rows_list(cfg)
        train_rows, dropped = load_rows(cfg.data, cfg.data_split, skipped, **template)
        if cfg.eval_data:
            eval_rows, eval_dropped = load_rows(cfg.eval_data, cfg.eval_split, skipped, **template)
            dropped = dropped + eval_dropped
        else:
            train_rows, eval_rows = split_eval(train_rows, cfg.eval_fraction, cfg.seed)
        loaded = train_rows + eval_rows
        out = {
            "dropped": [asdict(d) for d in (skipped or []) + dropped],
            "warnings": duplicate_rows(loaded) + unknown_text_rows(loaded, tokenizer),
        }
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            examples, stats = tokenize_rows(rows, tokenizer, cfg.max_length, cfg.max_prompt_length)
            out[name] = examples
            out[f"{name}_stats"] = vars(stats)
        return out

    data = cached(cache_dir(cfg) / f"{kind}-{key}.json", build)
    write_data_stats(cfg.output_dir, data)
    report_dropped(cfg, [DroppedRow(**d) for d in data["dropped"]], log)
    for warning in data["warnings"]:
        log(warning)
    for name in ("train", "eval"):
        s = data[f"{name}_stats"]
        if s["rows"] or s["dropped_empty"]:
            log(
                f"{name}: {s['rows']} examples; {s['dropped_empty']} dropped (no completion tokens left "
                f"after truncation); {s['truncated_prompts']} prompts and {s['truncated_completions']} "
                "completions truncated"
                + (
                    f"; {len(data['dropped'])} rows left out (see above)"
                    if name == "train" and data["dropped"]
                    else ""
                )
            )
    if not data["train"]:
        raise ValueError(f"{cfg.data}: no training examples left after tokenisation and truncation")
    return data["train"], data["eval"]


def write_data_stats(output_dir: str | Path, data: dict) -> None:
    """output_dir/data_stats.json: rows per split, rows dropped, prompts and completions truncated (the
    run's report shows it)."""
    stats = {name: data[f"{name}_stats"] for name in ("train", "eval")}
    stats["unusable rows"] = len(data["dropped"])
    path = Path(output_dir) / "data_stats.json"
    atomic_write(path, json.dumps(stats, indent=1) + "\n")  # every process writes the same numbers


def prepare_preference_data(cfg, tokenizer, log=print) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, eval) preference examples for `cfg`; dropped HH rows are reported."""

    def load(source: str, split: str, skipped, **template):
        data = load_preference_rows(source, split, tokenizer, skipped, **template)
        return data.rows, data.dropped

    return prepare_cached(cfg, tokenizer, load, tokenize_preference_rows, kind="preference", log=log)


def prepare_sft_data(cfg, tokenizer, log=print) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, eval) SFT examples for `cfg`."""
    return prepare_cached(
        cfg,
        tokenizer,
        lambda s, split, skipped, **template: (load_sft_rows(s, split, tokenizer, skipped, **template), []),
        tokenize_sft_rows,
        kind="sft",
        log=log,
    )


def prepare_unpaired_data(cfg, tokenizer, log=print) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, eval) unpaired examples {prompt_ids, completion_ids, label, line} for `cfg`."""
    return prepare_cached(
        cfg,
        tokenizer,
        lambda s, split, skipped, **template: (
            load_unpaired_rows(s, split, tokenizer, skipped, **template),
            [],
        ),
        tokenize_sft_rows,
        kind="unpaired",
        log=log,
    )


def prepare_logged_data(cfg, tokenizer, log=print) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, eval) logged examples {prompt_ids, completion_ids, reward, line} (offline RL)."""
    return prepare_cached(
        cfg,
        tokenizer,
        lambda s, split, skipped, **template: (
            load_logged_rows(s, split, tokenizer, skipped, **template),
            [],
        ),
        tokenize_sft_rows,
        kind="logged",
        log=log,
    )


def prepare_listwise_data(cfg, tokenizer, log=print) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, eval) list examples {prompt_ids, responses_ids, scores | probs | ranking, line}."""
    return prepare_cached(
        cfg,
        tokenizer,
        lambda s, split, skipped, **template: (
            load_listwise_rows(s, split, tokenizer, skipped, **template),
            [],
        ),
        tokenize_listwise_rows,
        kind="listwise",
        log=log,
    )
