"""`alignkit generate`: best-of-n sampling (inference-time alignment), or ICDPO's training-free choice.

For every prompt, n completions are sampled from the model (`generation.sampling.sample_ids`: token ids as
sampled, seeded), every candidate is scored by a reward set (the `rewards:` list of every command), and one
is kept:

- method=reward (best-of-n): the candidate with the largest total reward;
- method=icdpo: the candidate with the largest ICDPO score log p(y | demos, x) - log p(y | x)
  (`alignkit.inference.icdpo`), demonstrations retrieved from a file of preferred (prompt, response) rows. The
  rewards are still computed, to report how often ICDPO's choice is the reward's and what it gains.

Ties go to the lowest index (the first candidate sampled among the best); a NaN score never wins.

Output, in output_dir: candidates.jsonl, one line per prompt in prompt order: {index, prompt, candidates:
[{text, completion_ids, scores: {source: value}, total (, icdpo, logp_demos, logp)}], chosen, chosen_text
(, demos, demo_tokens_cut)}; summary.json (`summarize`); config.yaml. Each line is flushed and fsynced as
its prompt finishes, so a killed run loses at most the prompt it was on: resume=true continues at the next
unfinished prompt (a torn last line is dropped first) and scores nothing twice. Prompts are sampled in
chunks of `chunk_prompts`, chunk c with a seed derived from (seed, c): a resumed run samples the chunk it
stopped in again, identically, and scores only its unfinished prompts, so its file is the uninterrupted
run's, byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config.load import ConfigError, validate
from alignkit.config.tools import GenerateConfig
from alignkit.data.prompts import encode_prompt
from alignkit.evaluation.stats import mean_and_stderr
from alignkit.generation.resolve import with_resolved_backend
from alignkit.generation.sampling import sample_ids, sample_seed
from alignkit.io import append_jsonl, atomic_write, cut_torn_line, read_jsonl
from alignkit.rewards.base import ScoreContext
from alignkit.rewards.compose import RewardSet

OUTPUT_FILES = ("config.yaml", "candidates.jsonl", "summary.json")
RESUMABLE_CHANGES = ("num_prompts",)  # settings a resumed run may change: the lines written stay


@dataclass
class Candidates:
    """The n sampled completions of one prompt and their scores."""

    prompt: str | list[dict]
    """The prompt as given: its text, or a conversational row's messages (what the rewards read)."""
    prompt_ids: list[int]
    """The prompt's token ids as the model saw them."""
    completion_ids: list[list[int]]
    """Each candidate's ids as sampled (cut after the first EOS, which is kept)."""
    texts: list[str]
    """Each candidate decoded without special tokens."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    """Raw score of every candidate by every reward source (costs included), by source name."""
    totals: list[float] = field(default_factory=list)
    """Each candidate's composed total reward."""
    columns: dict = field(default_factory=dict)
    """The prompt row's other columns (`PromptRow.columns`), for the reward sources that read them."""
    origin: str | None = None
    """Where the prompt row came from (file:line), for the sources' error messages."""


def sample_candidates(
    model,
    tokenizer,
    prompts: list[str | list[dict]],
    prompt_ids: list[list[int]] | None = None,
    *,
    n: int,
    seed: int = 0,
    sampler=None,
    **sampling,
) -> list[Candidates]:
    """n samples of every prompt (`generation.sampling.sample_ids`, seeded by `seed`; `sampling`: max_new_tokens,
    temperature, top_k, top_p, batch_size, backend), unscored. `prompts` are texts, or with `prompt_ids` also
    conversations (`PromptRow.reward_input`: what the rewards read). `prompt_ids` default to the one prompt encoder's
    ids of `prompts` (`data.prompts.encode_prompt`: one BOS). One call draws from one seeded stream: the same prompts,
    settings and seed give the same candidates, but a prompt's candidates also depend on which prompts
    share the call (`alignkit generate` fixes that with seeded chunks). `sampler` (a synced
    `generation.backends.Sampler`, e.g. vLLM's engine) draws them instead, one seeded request per prompt."""
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt_ids")
    if sampler is None:
        ids = sample_ids(model, tokenizer, prompt_ids, num_samples=n, seed=seed, **sampling)
    else:
        sampling.pop("backend", None)
        ids = sampler.sample(
            model, tokenizer, prompt_ids, num_samples=n, seed=seed, **sampling
        ).completion_ids
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [
        Candidates(prompt, list(p_ids), ids[i * n : (i + 1) * n], texts[i * n : (i + 1) * n])
        for i, (prompt, p_ids) in enumerate(zip(prompts, prompt_ids))
    ]


def score_candidates(candidates: list[Candidates], rewards: RewardSet) -> list[Candidates]:
    """Fills every candidate's per-source scores and total: one `score_sources` call for all of them (the
    sources that read row columns get each prompt's `columns`, its candidates' token ids and their group),
    composed without updating a normaliser's statistics. Returns `candidates`."""
    prompts = [c.prompt for c in candidates for _ in c.texts]
    texts = [t for c in candidates for t in c.texts]
    if not texts:
        return candidates
    names = dict.fromkeys(name for c in candidates for name in c.columns)
    context = ScoreContext(
        {name: [c.columns.get(name) for c in candidates for _ in c.texts] for name in names},
        [list(ids) for c in candidates for ids in c.completion_ids],
        [g for g, c in enumerate(candidates) for _ in c.texts],
        None,
        [c.origin or f"prompt {g}" for g, c in enumerate(candidates) for _ in c.texts],
    )
    raw = rewards.score_sources(prompts, texts, context)
    totals = rewards.compose(raw, update=False).total.tolist()
    at = 0
    for c in candidates:
        k = len(c.texts)
        c.scores = {name: values[at : at + k].tolist() for name, values in raw.items()}
        c.totals = totals[at : at + k]
        at += k
    return candidates


def sample_and_score(
    model,
    tokenizer,
    prompts: list[str],
    prompt_ids: list[list[int]] | None,
    *,
    rewards: RewardSet,
    **sampling,
) -> list[Candidates]:
    """Prompts -> per-prompt candidates (token ids as sampled, text) with per-source scores and totals:
    `sample_candidates` then `score_candidates` (keywords: n, seed, max_new_tokens, temperature, top_k,
    top_p, batch_size, backend)."""
    return score_candidates(sample_candidates(model, tokenizer, prompts, prompt_ids, **sampling), rewards)


def choose_best(values: list[float]) -> int:
    """Index of the largest value; ties go to the lowest index, and a NaN never wins (all NaN: 0)."""
    best = 0
    for i, v in enumerate(values):
        if not math.isnan(v) and (math.isnan(values[best]) or v > values[best]):
            best = i
    return best


# ---------------------------------------------------------------------------------------------------
# The JSONL output: one line per finished prompt, durable before the next prompt starts.


def _number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def candidate_record(index: int, c: Candidates, chosen: int, extra: dict | None = None) -> dict:
    """The output line of prompt `index` (module docstring); `extra`: per-candidate lists (icdpo, ...)
    under "candidates" and other keys beside them."""
    extra = dict(extra or {})
    per_candidate = extra.pop("candidates", {})
    rows = []
    for j, (ids, text) in enumerate(zip(c.completion_ids, c.texts)):
        row = {
            "text": text,
            "completion_ids": ids,
            "scores": {name: _number(v[j]) for name, v in c.scores.items()},
            "total": _number(c.totals[j]),
        }
        row.update({key: _number(values[j]) for key, values in per_candidate.items()})
        rows.append(row)
    return {
        "index": index,
        "prompt": c.prompt,
        "candidates": rows,
        "chosen": chosen,
        "chosen_text": c.texts[chosen],
        **extra,
    }


def read_finished(path: Path) -> list[dict]:
    """The whole lines of a candidates.jsonl written by an earlier run. A torn last line (no newline, or
    not JSON: the run was killed while writing it) is cut off the file; a bad line before the last, or
    lines out of prompt order, are an error naming path:line."""
    found = read_jsonl(path)
    if found.bad:
        line, why = found.bad[0]
        raise ValueError(f"{path}:{line}: {why}; delete the file or set overwrite=true")
    for expected, (line, record) in enumerate(zip(found.lines, found.records)):
        if record.get("index") != expected:
            raise ValueError(
                f"{path}:{line}: index {record.get('index')}, expected {expected} (lines are written in "
                "prompt order); delete the file or set overwrite=true"
            )
    if cut_torn_line(path, found):
        print(f"{path}:{found.torn_line}: dropping a torn last line (the run was stopped while writing it)")
    return found.records


# ---------------------------------------------------------------------------------------------------
# Summary statistics, over prompts.


def _stat(values: list[float]) -> dict:
    mean, stderr = mean_and_stderr(values)
    return {"mean": mean, "stderr": stderr}


def summarize(records: list[dict]) -> dict:
    """Statistics of the totals over prompts (mean and s.e. over prompts), from the output lines:

    chosen (the kept candidates), mean_candidate (each prompt's mean over its n: what a random pick gets
    in expectation), first_candidate (sample 0: plain sampling), best (each prompt's largest total);
    gain_over_mean, gain_over_first: paired per-prompt differences of chosen; best_of_k: the mean best
    total among each prompt's first k candidates, k = 1, 2, 4, ... <= n (the best-of-n curve from one
    run); agreement (when the choice was not by reward): the fraction of prompts whose chosen candidate
    has the best total (ties count), and chance_agreement, what a uniformly random pick would reach.
    """
    if not records:
        raise ValueError("no finished prompts to summarise")
    totals = [[math.nan if c["total"] is None else c["total"] for c in r["candidates"]] for r in records]
    chosen = [t[r["chosen"]] for t, r in zip(totals, records)]
    means = [sum(t) / len(t) for t in totals]
    first = [t[0] for t in totals]
    best = [max(t) for t in totals]
    n = min(len(t) for t in totals)
    out = {
        "prompts": len(records),
        "n": n,
        "chosen": _stat(chosen),
        "mean_candidate": _stat(means),
        "first_candidate": _stat(first),
        "best": _stat(best),
        "gain_over_mean": _stat([c - m for c, m in zip(chosen, means)]),
        "gain_over_first": _stat([c - f for c, f in zip(chosen, first)]),
        "best_of_k": {str(k): _stat([max(t[:k]) for t in totals]) for k in _powers_of_two(n)},
    }
    if "icdpo" in records[0]["candidates"][0]:
        out["agreement"] = _stat([float(c == b) for c, b in zip(chosen, best)])
        out["chance_agreement"] = sum(t.count(max(t)) / len(t) for t in totals) / len(totals)
    return out


def _powers_of_two(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def format_summary(summary: dict) -> str:
    """The summary as a few lines of text (mean ± s.e. over prompts)."""

    def pm(s: dict) -> str:
        return f"{s['mean']:+.4f} ± {s['stderr']:.4f}"

    lines = [
        f"{summary['prompts']} prompts, n = {summary['n']}; total reward, mean ± s.e. over prompts:",
        f"  chosen           {pm(summary['chosen'])}",
        f"  mean candidate   {pm(summary['mean_candidate'])}   (a random pick, in expectation)",
        f"  first candidate  {pm(summary['first_candidate'])}",
        f"  best candidate   {pm(summary['best'])}",
        f"  chosen - mean    {pm(summary['gain_over_mean'])}   (paired)",
        f"  chosen - first   {pm(summary['gain_over_first'])}   (paired)",
        "  best of k: " + ", ".join(f"k={k} {s['mean']:+.4f}" for k, s in summary["best_of_k"].items()),
    ]
    if "agreement" in summary:
        lines.append(
            f"  agreement with the reward's choice {summary['agreement']['mean']:.3f} ± "
            f"{summary['agreement']['stderr']:.3f} (chance {summary['chance_agreement']:.3f})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# `alignkit generate`.


def check_config(cfg: GenerateConfig) -> None:
    """Everything that can be checked before data or models load: required fields, ranges, reward specs."""
    from alignkit.rewards.registry import parse_spec

    missing = [key for key in ("model", "prompts") if not getattr(cfg, key)]
    if cfg.method == "icdpo" and not cfg.demos:
        missing.append("demos")
    if missing:
        raise ConfigError(f"set {', '.join(f'{k}=...' for k in missing)} (see alignkit generate --help)")
    validate(cfg)
    if not isinstance(cfg.rewards, list) or not cfg.rewards:
        raise ConfigError("'rewards': expected a non-empty list of reward sources, e.g. [{type: vader}]")
    for i, spec in enumerate(cfg.rewards):
        parse_spec(spec, f"rewards[{i}]")


def claim(cfg: GenerateConfig) -> None:
    """The refuse / resume / overwrite rules of `rundir.claim_output_dir`; resuming under other settings
    than the run's config.yaml (bar RESUMABLE_CHANGES) is an error naming them."""
    from alignkit.training.checkpoint import (
        default_fingerprint,
        fingerprint_differences,
        load_yaml,
        run_fingerprint,
    )
    from alignkit.training.rundir import claim_output_dir

    out = Path(cfg.output_dir)
    if not (cfg.resume and (out / "candidates.jsonl").exists()):
        claim_output_dir(out, overwrite=cfg.overwrite, patterns=OUTPUT_FILES)
        return
    if cfg.overwrite:
        raise ConfigError(
            "resume=true and overwrite=true contradict each other: continue the run, or replace it"
        )
    saved_path = out / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"resume=true, but {saved_path} is missing: set overwrite=true to start again")
    saved = run_fingerprint(load_yaml(saved_path.read_text()))
    current = run_fingerprint(cfg)
    for key in RESUMABLE_CHANGES:
        saved.pop(key, None), current.pop(key, None)
    differences = fingerprint_differences(saved, current, default_fingerprint(cfg))
    if differences:
        raise ConfigError(
            f"{out} was generated with other settings: {'; '.join(differences)}. Resume with its own "
            "settings (its config.yaml), or use another output_dir (or overwrite=true)"
        )


def run(cfg: GenerateConfig) -> dict:
    """`alignkit generate`: samples, scores and chooses for every unfinished prompt, appending one durable
    line per prompt to output_dir/candidates.jsonl; writes and prints the summary; returns it."""
    from alignkit.config.load import save_config
    from alignkit.data.prompts import encode_prompt_rows, load_prompt_rows
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout import sampler_for

    check_config(cfg)
    cfg = with_resolved_backend(cfg)  # generation.backend=auto -> loop or hf, saved with the run
    claim(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = {"system_prompt": cfg.system_prompt, "chat_template_kwargs": cfg.chat_template_kwargs}
    rewards = RewardSet.from_specs(cfg.rewards)
    rows = load_prompt_rows(cfg.prompts, tokenizer=tokenizer, **template, columns=rewards.columns)
    rows, prompt_ids, cut = encode_prompt_rows(
        rows[: cfg.num_prompts or None], tokenizer, cfg.max_prompt_length
    )
    prompts = [r.reward_input for r in rows]  # conversations stay messages, for the rewards
    chooser = None
    if cfg.method == "icdpo":
        from alignkit.inference.icdpo import IcdpoChooser
        from alignkit.rewards.base import prompt_text

        chooser = IcdpoChooser.from_config(cfg, [prompt_text(p) for p in prompts], tokenizer)
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    path = out / "candidates.jsonl"
    done = len(read_finished(path))
    print(f"{len(prompts)} prompts ({cut} cut to max_prompt_length); {done} already done in {path}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # It samples with its own forward; alignkit computes no log-probs of it.
    model = load_causal_lm(cfg.model, cfg.dtype, pad_token_id=tokenizer.pad_token_id, check_logps=False)
    model = model.to(device)
    g = cfg.generation
    sampling = dict(
        n=cfg.n,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        batch_size=g.batch_size,
        backend=g.backend,
    )
    sampler = None
    if g.backend == "vllm":  # the engine starts from cfg.model (an adapter folder's base): synced once
        sampler = sampler_for(g, cfg.model, model, tokenizer, prompt_ids)
        sampler.sync(model, 0)
    C = cfg.chunk_prompts
    starts = range(done // C * C, len(prompts), C)
    if cfg.progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", unit="chunk")
    with open(path, "a", encoding="utf-8") as f:
        for start in starts:
            stop = min(start + C, len(prompts))
            seed = sample_seed(cfg.seed, start // C) % 2**63
            chunk = sample_candidates(
                model,
                tokenizer,
                prompts[start:stop],
                prompt_ids[start:stop],
                seed=seed,
                sampler=sampler,
                **sampling,
            )
            for c, row in zip(chunk, rows[start:stop]):  # what the reward sources may read
                c.columns, c.origin = row.columns, row.origin
            first = max(done, start)  # a resumed chunk: its finished prompts are sampled again, not scored
            todo = score_candidates(chunk[first - start :], rewards)
            extras = chooser(model, todo, range(first, stop)) if chooser else [{} for _ in todo]
            for i, (c, extra) in enumerate(zip(todo, extras)):
                by = extra["candidates"]["icdpo"] if chooser else c.totals
                append_jsonl(f, candidate_record(first + i, c, choose_best(by), extra), durable=True)
    records = read_finished(path)
    summary = summarize(records)
    summary["resumed_at"] = done
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"candidates in {path}; summary in {out / 'summary.json'}")
    return summary
