"""Rollout generation time: `generation.sampling.sample_ids`'s lean decode loop (backend="loop") vs the same
call through transformers' `generate` (backend="hf"), on the shipped model, in one process; and, for its
cost, `generation.sampling.sample`, the evaluation sampler (one seeded generator per sample, so a sample does not depend
on its batch; `generate` with Gumbel noise; decodes text too).

    python benchmarks/generation_speed.py              # 8 prompts x 8 samples x 48 new tokens, 7 rounds
    python benchmarks/generation_speed.py --rounds 11 --threads 1

The setting is one rollout of benchmarks/grpo_vs_trl.py: the first `--prompts` prompts of
alignkit/assets/demo/pairs.jsonl, `--samples` completions each (64 rows in one batch), `--max-new-tokens`
tokens, temperature 1, no truncation, fp32 on CPU. The samplers alternate within each round (which goes
first rotates too), so load from other processes on a shared machine falls on all alike; the medians
over rounds are reported. A warm-up call of each comes first and is not counted. Each round uses a
different seed, the same for both backends (the two draw different samples for a seed, so lengths can
differ when completions end early: tokens/s is printed beside the seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure the alignkit of this checkout, whatever is installed

from alignkit.generation.sampling import sample, sample_ids  # noqa: E402
from alignkit.models.load import load_causal_lm, load_tokenizer  # noqa: E402

MODEL = REPO / "alignkit" / "assets" / "tinystories-656k"
PROMPTS = REPO / "alignkit" / "assets" / "demo" / "pairs.jsonl"
BACKENDS = {"generate": "hf", "lean loop": "loop", "sample": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(str(MODEL))
    model = load_causal_lm(str(MODEL), pad_token_id=tokenizer.pad_token_id)
    rows = [json.loads(line)["prompt"] for line in open(PROMPTS)][: args.prompts]
    prompt_ids = [tokenizer(r)["input_ids"] for r in rows]
    kwargs = dict(
        num_samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.prompts * args.samples,
    )

    def timed(backend: str, seed: int) -> tuple[float, int]:
        t = time.perf_counter()
        if BACKENDS[backend] is None:  # the evaluation sampler
            out = [s.completion_ids for s in sample(model, tokenizer, rows, seed=seed, **kwargs)]
        else:
            out = sample_ids(model, tokenizer, prompt_ids, seed=seed, backend=BACKENDS[backend], **kwargs)
        return time.perf_counter() - t, sum(len(c) for c in out)

    for backend in BACKENDS:  # warm-up
        timed(backend, -1)
    seconds = {b: [] for b in BACKENDS}
    tokens = {b: [] for b in BACKENDS}
    order = list(BACKENDS)
    for r in range(args.rounds):
        for backend in order[r % len(order) :] + order[: r % len(order)]:
            s, n = timed(backend, r)
            seconds[backend].append(s)
            tokens[backend].append(n)

    rows_out = {}
    print(
        f"{args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} new tokens, "
        f"{args.rounds} rounds, torch threads {torch.get_num_threads()}, "
        f"1-minute load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':>10} {'median s':>9} {'min s':>7} {'max s':>7} {'tokens/s':>9}")
    for b in BACKENDS:
        median = statistics.median(seconds[b])
        rate = sum(tokens[b]) / sum(seconds[b])
        rows_out[b] = {"median_s": median, "seconds": seconds[b], "tokens_per_s": rate}
        print(f"{b:>10} {median:>9.3f} {min(seconds[b]):>7.3f} {max(seconds[b]):>7.3f} {rate:>9.0f}")
    speedup = rows_out["generate"]["median_s"] / rows_out["lean loop"]["median_s"]
    print(f"speed-up of the lean loop (ratio of medians): {speedup:.2f}x")
    print(
        json.dumps({"args": vars(args), "threads": torch.get_num_threads(), **rows_out, "speedup": speedup})
    )


if __name__ == "__main__":
    main()
