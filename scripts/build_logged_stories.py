"""Builds logged story completions for the offline-RL worked example (docs/offline_rl.md).

The "logging policy" is the shipped TinyStories-656K model: for each story opening of
alignkit/assets/demo/pairs.jsonl (365 openings, none of them held out), it samples --samples continuations
(full softmax, temperature 1, seeded), and writes {"prompt", "response"} rows. Score them afterwards with
`alignkit score` to get the logged `reward`:

    python scripts/build_logged_stories.py --output runs/logged/responses.jsonl
    alignkit score examples/offline_rl/vader.yaml data=runs/logged/responses.jsonl \
        output=runs/logged/logged.jsonl

Responses are the decoded text (`alignkit offline-rl` re-tokenises it with the prompt).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignkit.generation.sampling import sample
from alignkit.models.load import load_causal_lm, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "alignkit" / "assets" / "tinystories-656k"
DEFAULT_PROMPTS = REPO / "alignkit" / "assets" / "demo" / "pairs.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the logging policy")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="rows with a 'prompt' field")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="where the {prompt, response} rows go (.jsonl)")
    args = parser.parse_args()

    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in open(args.prompts) if line.strip()))
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, pad_token_id=tokenizer.pad_token_id)
    t0 = time.perf_counter()
    samples = sample(
        model,
        tokenizer,
        prompts,
        num_samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    rows = [{"prompt": s.prompt, "response": s.text} for s in samples if s.text.strip()]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(
        f"{len(rows)} responses ({len(samples) - len(rows)} empty ones left out) to {len(prompts)} prompts "
        f"written to {out} in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
