"""Before/after evaluation of a policy: sentiment of its samples, fluency under the base model, samples.

`compare_policies` samples a base and an aligned policy on the same held-out prompts with the same seeds
(so sample j of both sees the same random noise, see `alignkit.generation`) and reports:

- the mean VADER compound sentiment of each policy's completions, with standard errors, and the
  difference with its paired standard error;
- the base model's perplexity of each policy's completions: a policy that games the scorer with
  degenerate text shows up as a perplexity far above that of the base model's own samples;
- a few completions side by side.
"""

from __future__ import annotations

import math
import textwrap

import torch

from alignkit.generation import sample
from alignkit.logprobs import completion_logps
from alignkit.rewards.rules import vader_compound


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with n - 1, over sqrt n; 0 for n < 2)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_stderr of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@torch.no_grad()
def completion_nll(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    batch_size: int = 32,
) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood of each completion given its prompt, and its token count.

    Rows are `prompt_ids[i] + completion_ids[i]`, right-padded into batches of `batch_size`; only the
    completion tokens are scored (through `alignkit.logprobs.completion_logps`). The model is run in
    eval mode and given back in the mode it was in.
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
    total = sum(counts)
    if total == 0:
        raise ValueError("perplexity of completions with no tokens")
    return math.exp(sum(sums) / total)


def compare_policies(
    base_model,
    aligned_model,
    tokenizer,
    openings: list[str],
    samples_per_opening: int = 4,
    max_new_tokens: int = 48,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 32,
    num_examples: int = 4,
) -> dict:
    """Samples both policies on `openings` with the same seeds and compares them (see module docstring).

    Returns a JSON-serialisable dict:
      settings: num_openings, samples_per_opening, max_new_tokens, temperature, seed;
      base, aligned: {sentiment_mean, sentiment_stderr, base_model_perplexity, mean_tokens,
                      eos_fraction};
      sentiment_difference (aligned - base mean) and sentiment_difference_stderr (paired: the
      standard error of the per-sample differences, as sample j of both policies shares its seed);
      examples: the first sample of the first `num_examples` openings, side by side.
    """
    kwargs = dict(
        num_samples=samples_per_opening,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    samples = {
        "base": sample(base_model, tokenizer, openings, **kwargs),
        "aligned": sample(aligned_model, tokenizer, openings, **kwargs),
    }
    eos_ids = {tokenizer.eos_token_id}
    scores: dict[str, list[float]] = {}
    report: dict = {
        "settings": {
            "num_openings": len(openings),
            "samples_per_opening": samples_per_opening,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
        }
    }
    for name, policy_samples in samples.items():
        scores[name] = vader_compound([s.text for s in policy_samples])
        mean, stderr = mean_and_stderr(scores[name])
        completions = [s.completion_ids for s in policy_samples]
        report[name] = {
            "sentiment_mean": mean,
            "sentiment_stderr": stderr,
            "base_model_perplexity": perplexity(
                base_model, [s.prompt_ids for s in policy_samples], completions, batch_size
            ),
            "mean_tokens": sum(len(c) for c in completions) / len(completions),
            "eos_fraction": sum(bool(c) and c[-1] in eos_ids for c in completions) / len(completions),
        }
    differences = [a - b for a, b in zip(scores["aligned"], scores["base"])]
    report["sentiment_difference"], report["sentiment_difference_stderr"] = mean_and_stderr(differences)
    report["examples"] = [
        {
            "prompt": openings[i],
            "base": samples["base"][j].text,
            "base_score": scores["base"][j],
            "aligned": samples["aligned"][j].text,
            "aligned_score": scores["aligned"][j],
        }
        for i in range(min(num_examples, len(openings)))
        for j in [i * samples_per_opening]
    ]
    return report


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # newlines and runs of spaces -> one space
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(report: dict, width: int = 100) -> str:
    """Renders a `compare_policies` report as a plain-text table followed by side-by-side samples."""
    base, aligned = report["base"], report["aligned"]
    s = report["settings"]
    lines = [
        f"{s['num_openings']} held-out openings x {s['samples_per_opening']} samples, "
        f"{s['max_new_tokens']} new tokens, temperature {s['temperature']}, seed {s['seed']}",
        "",
        f"{'':28}{'base':>10}{'aligned':>10}{'difference':>14}",
        f"{'sentiment (VADER compound)':28}{base['sentiment_mean']:>+10.3f}{aligned['sentiment_mean']:>+10.3f}"
        f"{report['sentiment_difference']:>+14.3f}",
        f"{'  standard error':28}{base['sentiment_stderr']:>10.3f}{aligned['sentiment_stderr']:>10.3f}"
        f"{report['sentiment_difference_stderr']:>14.3f}",
        f"{'base-model perplexity':28}{base['base_model_perplexity']:>10.2f}"
        f"{aligned['base_model_perplexity']:>10.2f}"
        f"{aligned['base_model_perplexity'] - base['base_model_perplexity']:>+14.2f}",
        f"{'mean completion tokens':28}{base['mean_tokens']:>10.1f}{aligned['mean_tokens']:>10.1f}"
        f"{aligned['mean_tokens'] - base['mean_tokens']:>+14.1f}",
    ]
    for k, ex in enumerate(report["examples"], 1):
        lines += ["", f"[{k}] {_clip(ex['prompt'], width)}"]
        for name in ("base", "aligned"):
            head = f"  {name:<8}({ex[name + '_score']:+.2f}) "
            text = _clip(ex[name], 2 * width) or "(empty)"
            lines += textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * len(head))
    return "\n".join(lines)
