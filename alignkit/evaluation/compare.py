"""Before/after evaluation: a base and an aligned policy on held-out prompts, scored by any reward set.

`compare_policies` samples both policies on the same prompts with the same seeds (sample j of both sees
the same random noise, see `alignkit.generation.sampling`: common random numbers), scores both sample sets with
every source of a `RewardSet` (which need not be the training reward) and reports, per source:

- mean, std and standard error before (base) and after (aligned);
- the difference (aligned - base) with its *paired* standard error, computed on the per-sample
  differences: sample j of both policies shares its seed, so the noise common to both cancels;
- `percent_change` = (after - before) / |before| x 100 (positive = the score went up);
- the win rate per prompt: the fraction of prompts whose aligned mean over its n samples beats the base
  mean, ties counting 1/2.

Standard errors are over prompts (the standard deviation of the P per-prompt means over sqrt P): the n
samples of one prompt share that prompt and are not independent draws of the evaluation distribution.

Besides the rewards: KL(aligned || base) per sequence, estimated on the aligned samples as
mean_j Σ_t [log p_aligned(y_jt | ...) - log p_base(y_jt | ...)] at temperature 1 (an unbiased Monte-Carlo
estimate when the samples come from the aligned model's own distribution: temperature 1, no top-k/top-p);
the base model's perplexity of both sample sets (fluency: text that games the scorer shows up as a
perplexity far above that of the base model's own samples); mean completion tokens and EOS fraction; and
a few samples side by side. `alignkit eval` (`run`) writes it all as JSON and Markdown; docs/evaluation.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from alignkit.data.prompts import encode_prompt
from alignkit.evaluation.stats import compare_scores, score_stats
from alignkit.generation.sampling import Sample, eos_ids, sample
from alignkit.io import atomic_write
from alignkit.logprobs.completion import completion_logps
from alignkit.rewards.base import row_context
from alignkit.rewards.compose import RewardSet


def sampled_texts(
    sampler, model, tokenizer, prompts: list[str], *, version: int, num_samples: int, seed: int, **settings
) -> list[Sample]:
    """`generation.sampling.sample`'s result drawn by `sampler` synced to `model` (as weights `version`):
    prompts encoded by the one prompt encoder, completions decoded without special tokens."""
    sampler.sync(model, version)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    drawn = sampler.sample(model, tokenizer, prompt_ids, num_samples=num_samples, seed=seed, **settings)
    texts = tokenizer.batch_decode(drawn.completion_ids, skip_special_tokens=True)
    rows = [(p, ids) for p, ids in zip(prompts, prompt_ids) for _ in range(num_samples)]
    return [Sample(p, list(ids), c, t) for (p, ids), c, t in zip(rows, drawn.completion_ids, texts)]


@torch.no_grad()
def completion_nll(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    batch_size: int = 32,
) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood of each completion given its prompt, and its token count.

    Rows are `prompt_ids[i] + completion_ids[i]`, right-padded into batches of `batch_size`; only the
    completion tokens are scored (through `alignkit.logprobs.completion.completion_logps`, at temperature 1:
    the model's own distribution). The model is run in eval mode and given back in the mode it was in.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        sums: list[float] = []
        counts: list[int] = []
        for start in range(0, len(prompt_ids), batch_size):
            prompts = prompt_ids[start : start + batch_size]
            completions = completion_ids[start : start + batch_size]
            T = max(len(p) + len(c) for p, c in zip(prompts, completions))
            # Id 0 fills the padding: the attention mask hides it and the completion mask never scores it.
            input_ids = torch.zeros(len(prompts), T, dtype=torch.long)
            attention_mask = torch.zeros(len(prompts), T, dtype=torch.long)
            completion_mask = torch.zeros(len(prompts), T, dtype=torch.long)
            for i, (p, c) in enumerate(zip(prompts, completions)):
                if not p:
                    raise ValueError(f"row {start + i}: empty prompt_ids (nothing predicts the first token)")
                input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
                attention_mask[i, : len(p) + len(c)] = 1
                completion_mask[i, len(p) : len(p) + len(c)] = 1
            logps = completion_logps(
                model, input_ids.to(device), attention_mask.to(device), completion_mask.to(device)
            )
            sums += (-logps.sum).tolist()
            counts += logps.count.tolist()
        return sums, counts
    finally:
        model.train(was_training)


def perplexity(
    model, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 32
) -> float:
    """Token-weighted perplexity of the completions: exp(total NLL / total completion tokens)."""
    sums, counts = completion_nll(model, prompt_ids, completion_ids, batch_size)
    return _perplexity(sums, counts)


def _perplexity(nll_sums: list[float], counts: list[int]) -> float:
    total = sum(counts)
    if total == 0:
        raise ValueError("perplexity of completions with no tokens")
    return math.exp(sum(nll_sums) / total)


def compare_policies(
    base_model,
    aligned_model,
    tokenizer,
    prompts: list[str],
    *,
    rewards: RewardSet,
    num_samples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    scoring_batch_size: int = 32,
    num_examples: int = 4,
    reward_prompts: list | None = None,
    reward_columns: list[dict] | None = None,
    sampler=None,
) -> dict:
    """Samples both policies on `prompts` with the same seeds and compares them (see the module docstring).

    `prompts` are the texts the policies continue (chat templates applied); `reward_prompts`, what the
    reward sources read for each (`PromptRow.reward_input`: a conversation's messages, which a reward
    model renders in its own template), default `prompts`; `reward_columns`, each prompt row's other columns
    (`PromptRow.columns`), for the sources that read them. `batch_size` sequences are sampled at once,
    `scoring_batch_size` scored at once for the log-likelihoods.

    Both sample sets are scored by every source of `rewards` in one call and composed together (so a
    normalising RewardSet uses the same statistics for both). Returns a JSON-serialisable dict:

      settings: num_prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed, sources,
                kl_of_sampled_distribution (temperature 1 and no truncation: see `kl`);
      rewards: {source: {base: {mean, std, stderr}, aligned: {...}, difference, difference_std,
                difference_stderr, percent_change, win_rate}} for every source, costs included;
      total: the same for the composed reward, present when there are several sources;
      kl: {mean, std, stderr, per_token}: KL(aligned || base) in nats per sequence, estimated on the
          aligned samples (per_token: total log-ratio / total aligned completion tokens);
      base, aligned: {base_model_perplexity, mean_tokens, eos_fraction};
      examples: the first sample of each of the first `num_examples` prompts, side by side, with scores.

    `sampler` (a `generation.backends.Sampler`, e.g. vLLM's engine) draws both sample sets instead of
    `generation.sampling.sample`, synced to each model in turn: the two models must share their weights'
    names and shapes. Its seeds are per prompt, the same for both models.
    """
    if not prompts:
        raise ValueError("compare_policies of no prompts")
    n = num_samples
    # 1. Sample both policies on the same prompts with the same seeds.
    sampling = dict(
        num_samples=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,  # the same seed for both policies: sample j of both shares its noise
        batch_size=batch_size,
    )
    policies = {"base": base_model, "aligned": aligned_model}
    if sampler is None:
        samples = {name: sample(model, tokenizer, prompts, **sampling) for name, model in policies.items()}
    else:  # one engine, synced to each model in turn (version 0: base, 1: aligned)
        samples = {
            name: sampled_texts(sampler, model, tokenizer, prompts, version=version, **sampling)
            for version, (name, model) in enumerate(policies.items())
        }
    # 2. Score both sample sets; 3. the log-likelihoods of each under the models.
    given = list(reward_prompts if reward_prompts is not None else prompts)
    if len(given) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(given)} reward_prompts")
    columns = reward_columns if reward_columns is not None else [{} for _ in prompts]
    if len(columns) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(columns)} reward_columns")
    scores, names = _score_both(rewards, given, samples, n, columns)
    likelihoods = _likelihood_stats(
        base_model, aligned_model, tokenizer, samples, num_samples=n, batch_size=scoring_batch_size
    )
    # 4. The report.
    report: dict = {
        "settings": {
            "num_prompts": len(prompts),
            "num_samples": n,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "sources": names,
            "kl_of_sampled_distribution": temperature == 1.0 and not top_k and (top_p is None or top_p >= 1),
        },
        "rewards": {name: compare_scores(*scores[name], n) for name in names},
    }
    if "total" in scores:
        report["total"] = compare_scores(*scores["total"], n)
    report.update(likelihoods)  # kl, base, aligned
    report["examples"] = _examples(prompts, samples, scores, num_samples=n, num_examples=num_examples)
    return report


def _score_both(
    rewards: RewardSet, reward_prompts: list, samples: dict, num_samples: int, columns: list[dict]
) -> tuple[dict, list]:
    """Both sample sets scored by every source of `rewards` in one call and composed together (so a
    normalising RewardSet uses the same statistics for both), given what the sources read for each prompt.
    Returns ({source: (base scores, aligned scores)}, each (P * n,), plus "total": the composed reward,
    when there are several sources; the source names)."""
    # Score both sets at once: (2 * P * n,), base first.
    both = samples["base"] + samples["aligned"]
    per_sample = [p for p in reward_prompts for _ in range(num_samples)]  # samples are prompt-major
    # The rows' columns, repeated per sample; one group per prompt and model.
    context = row_context(
        columns + columns, num_samples, completion_ids=[list(s.completion_ids) for s in both]
    )
    raw = rewards.score_sources(per_sample + per_sample, [s.text for s in both], context)
    composed = rewards.compose(raw)
    half = len(samples["base"])
    scores = {name: (values[:half], values[half:]) for name, values in raw.items()}
    names = list(raw)
    if len(names) > 1:
        scores["total"] = (composed.total[:half], composed.total[half:])
    return scores, names


def _likelihood_stats(
    base_model, aligned_model, tokenizer, samples: dict, *, num_samples: int, batch_size: int
) -> dict:
    """{kl, base, aligned} of the report (see `compare_policies`): the aligned samples scored under both
    models (KL(aligned || base), and the base model's fluency of them), the base samples under the base
    model; and each sample set's mean completion tokens and EOS fraction."""
    n = num_samples
    policies = {"base": base_model, "aligned": aligned_model}
    ids = {name: ([s.prompt_ids for s in ss], [s.completion_ids for s in ss]) for name, ss in samples.items()}
    nll_aligned, counts_aligned = completion_nll(aligned_model, *ids["aligned"], batch_size)
    nll_base_of_aligned, _ = completion_nll(base_model, *ids["aligned"], batch_size)
    nll_base_of_base, counts_base = completion_nll(base_model, *ids["base"], batch_size)
    # log p_aligned(y) - log p_base(y) per aligned sample y: (P * n,)
    log_ratio = torch.tensor(nll_base_of_aligned, dtype=torch.float64) - torch.tensor(
        nll_aligned, dtype=torch.float64
    )
    kl = score_stats(log_ratio, n)
    kl["per_token"] = float(log_ratio.sum()) / max(sum(counts_aligned), 1)
    stats: dict = {"kl": kl}
    for name, nll, counts in (
        ("base", nll_base_of_base, counts_base),
        ("aligned", nll_base_of_aligned, counts_aligned),
    ):
        completions = ids[name][1]
        stop_ids = eos_ids(policies[name], tokenizer)  # the ids sampling stopped at
        stats[name] = {
            "base_model_perplexity": _perplexity(nll, counts),
            "mean_tokens": sum(len(c) for c in completions) / len(completions),
            "eos_fraction": sum(bool(c) and c[-1] in stop_ids for c in completions) / len(completions),
        }
    return stats


def _examples(
    prompts: list[str], samples: dict, scores: dict, *, num_samples: int, num_examples: int
) -> list:
    """The first sample of each of the first `num_examples` prompts, base and aligned side by side, with
    every score of each."""
    examples = []
    for i in range(min(num_examples, len(prompts))):
        j = i * num_samples  # the first sample of prompt i
        row = {"prompt": prompts[i]}
        for side, name in enumerate(("base", "aligned")):
            row[name] = samples[name][j].text
            row[f"{name}_scores"] = {source: float(pair[side][j]) for source, pair in scores.items()}
        examples.append(row)
    return examples


def _cell(text: str, width: int = 240) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, clipped to `width` characters."""
    text = " ".join(text.split())
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text.replace("|", "\\|") or "(empty)"


def _num(x: float | None, spec: str = "+.3f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_markdown(report: dict) -> str:
    """A `compare_policies` report as Markdown: rewards, fluency and KL tables, then samples side by side."""
    s = report["settings"]
    truncation = [f"top_k {s['top_k']}"] if s["top_k"] else []
    if s["top_p"] is not None and s["top_p"] < 1:
        truncation.append(f"top_p {s['top_p']}")
    lines = ["# Base vs aligned model", ""]
    if "models" in report:
        lines += [f"base `{report['models']['base']}`, aligned `{report['models']['aligned']}`", ""]
    lines += [
        f"{s['num_prompts']} prompts x {s['num_samples']} samples per policy, the same seeds for both "
        f"(seed {s['seed']}); {s['max_new_tokens']} new tokens, temperature {s['temperature']}"
        + (", " + ", ".join(truncation) if truncation else ", no top-k/top-p")
        + ".",
        "",
        "## Rewards",
        "",
        "s.e.: standard error over prompts; difference = aligned - base, with its paired s.e.; "
        "change = (aligned - base) / |base| x 100; win rate: fraction of prompts where the aligned mean "
        "beats the base mean (ties ½).",
        "",
        "| source | base mean | base std | base s.e. | aligned mean | aligned std | aligned s.e. "
        "| difference | paired s.e. | change | win rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = dict(report["rewards"])
    if "total" in report:
        rows["total"] = report["total"]
    for name, r in rows.items():
        b, a = r["base"], r["aligned"]
        change = "n/a" if r["percent_change"] is None else f"{r['percent_change']:+.1f}%"
        lines.append(
            f"| {name} | {b['mean']:+.3f} | {b['std']:.3f} | {_num(b['stderr'], '.3f')} "
            f"| {a['mean']:+.3f} | {a['std']:.3f} | {_num(a['stderr'], '.3f')} "
            f"| {r['difference']:+.3f} | {_num(r['difference_stderr'], '.3f')} | {change} | {r['win_rate']:.3f} |"
        )
    base, aligned, kl = report["base"], report["aligned"], report["kl"]
    lines += [
        "",
        "## Fluency and KL",
        "",
        "| | base | aligned | difference |",
        "| --- | ---: | ---: | ---: |",
        f"| base-model perplexity | {base['base_model_perplexity']:.2f} | {aligned['base_model_perplexity']:.2f} "
        f"| {aligned['base_model_perplexity'] - base['base_model_perplexity']:+.2f} |",
        f"| mean completion tokens | {base['mean_tokens']:.1f} | {aligned['mean_tokens']:.1f} "
        f"| {aligned['mean_tokens'] - base['mean_tokens']:+.1f} |",
        f"| EOS fraction | {base['eos_fraction']:.3f} | {aligned['eos_fraction']:.3f} "
        f"| {aligned['eos_fraction'] - base['eos_fraction']:+.3f} |",
        "",
        f"KL(aligned ‖ base): {kl['mean']:.4f} nats per sequence (s.e. {_num(kl['stderr'], '.4f')}, "
        f"{kl['per_token']:.4f} per token), the mean over the aligned samples of "
        "Σ_t [log p_aligned(y_t) - log p_base(y_t)] at temperature 1.",
    ]
    if not s["kl_of_sampled_distribution"]:
        lines.append(
            "The samples were tempered or truncated, so this is the mean log-ratio of the two models on "
            "the aligned model's warped samples, not KL(aligned ‖ base); it can be negative."
        )
    lines += ["", "## Samples", "", "| # | prompt | base | base score | aligned | aligned score |"]
    lines.append("| ---: | --- | --- | --- | --- | --- |")
    for k, ex in enumerate(report["examples"], 1):
        scored = {
            name: ", ".join(f"{source} {value:+.3f}" for source, value in ex[f"{name}_scores"].items())
            for name in ("base", "aligned")
        }
        lines.append(
            f"| {k} | {_cell(ex['prompt'])} | {_cell(ex['base'])} | {scored['base']} "
            f"| {_cell(ex['aligned'])} | {scored['aligned']} |"
        )
    return "\n".join(lines) + "\n"


def write_reports(report: dict, output_dir: str | Path, stem: str = "eval_report") -> tuple[Path, Path]:
    """Writes `output_dir/<stem>.json` and `output_dir/<stem>.md`; returns both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{stem}.json", out / f"{stem}.md"
    for path, text in zip(
        paths, (json.dumps(report, indent=2, ensure_ascii=False) + "\n", format_markdown(report))
    ):
        atomic_write(path, text)  # never a half-written report
    return paths
