"""Builds the preference pairs shipped for `alignkit demo` (run once; its output is committed).

AI feedback without a judge model: for each story opening, the base model samples two continuations
and the one VADER scores more positive (compound score) is `chosen`. Pairs whose scores differ by less
than --min-gap carry almost no preference signal and are skipped.

    python scripts/build_demo_pairs.py

writes, under --out (default alignkit/assets/demo/):
  pairs.jsonl             {"prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids",
                           "chosen_score", "rejected_score"}, ids exactly as sampled (see
                           alignkit/generation/sampling.py for why they are not re-tokenised)
  heldout_openings.json   openings for the before/after evaluation, none of them a training opening
  README.md               how the files were built

Openings end with a space: the shipped tokenizer attaches the word boundary to the end of a piece
(`'he▁'`), so a prompt that ends mid-boundary would make the model finish the last word instead.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from alignkit.evaluation.stats import mean_and_stderr
from alignkit.generation.sampling import sample
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rewards.rules import vader_compound

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "alignkit" / "assets" / "tinystories-656k"
DEFAULT_OUT = REPO / "alignkit" / "assets" / "demo"

# (kind, pronoun, names). Adjectives and places are deliberately neutral: the continuation, not the
# opening, is scored, and an opening that already sets the mood leaves less room for a preference.
CHARACTERS = [
    ("girl", "she", ["Lily", "Sue", "Mia", "Anna", "Lucy", "Sara", "Amy", "Jane"]),
    ("boy", "he", ["Tom", "Ben", "Tim", "Sam", "Jack", "Max", "Leo", "Bob"]),
    ("dog", "he", ["Max", "Spot", "Rex", "Buddy", "Sparky"]),
    ("cat", "she", ["Kitty", "Mittens", "Luna", "Fluffy", "Tiger"]),
    ("bird", "she", ["Kiki", "Tweety", "Sunny", "Pip"]),
    ("rabbit", "he", ["Bunny", "Hop", "Benny", "Coco"]),
    ("bear", "he", ["Teddy", "Bruno", "Bongo"]),
    ("mouse", "she", ["Minnie", "Squeak", "Daisy"]),
    ("frog", "he", ["Freddy", "Hoppy", "Ribbit"]),
    ("duck", "she", ["Daisy", "Dot", "Quackers"]),
    ("fox", "he", ["Rusty", "Finn", "Red"]),
    ("fish", "she", ["Bubbles", "Goldie", "Nemo"]),
]
ADJECTIVES = ["little", "small", "big", "young", "old", "tiny"]
PLACES = [
    "in a small town", "in a big forest", "in a little house", "in a green field", "in a quiet village",
    "in a tall tree", "in a busy city", "on a farm", "in a garden", "by the sea", "by a river", "near a park",
]  # fmt: skip
SETTINGS = [
    "the park", "the river", "the forest", "the garden", "the beach", "the store", "school",
    "the farm", "the pond", "the hill", "the zoo", "the lake",
]  # fmt: skip
INTROS = [
    "Once upon a time, there was {a_adj} {kind} named {name}.",
    "Once upon a time, {place}, there lived {a_adj} {kind} named {name}.",
    "There was once {a_adj} {kind} called {name} who lived {place}.",
    "{name} was {a_adj} {kind}. {Pron} lived {place}.",
]
MIDDLES = [
    "",
    " {Pron} liked to play outside.",
    " Every day, {pron} went to {setting}.",
    " {Pron} had {a_adj2} box.",
    " {Pron} had many toys.",
]
ACTIONS = [
    " One day, {pron} ",
    " One day, {name} ",
    " One day, {name} went to {setting} and ",
    " One morning, {pron} saw a ",
    " One day, {name} found a ",
    " One day, {pron} wanted to ",
    " When {pron} woke up, {pron} ",
    " Then, {name} ",
]


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def draw_openings(n: int, rng: random.Random) -> list[str]:
    """`n` distinct openings, each from a random choice of template and fillers."""
    openings: dict[str, None] = {}  # insertion-ordered set
    while len(openings) < n:
        kind, pron, names = rng.choice(CHARACTERS)
        adj, adj2 = rng.sample(ADJECTIVES, 2)
        template = rng.choice(INTROS) + rng.choice(MIDDLES) + rng.choice(ACTIONS)
        opening = template.format(
            a_adj=_with_article(adj),
            a_adj2=_with_article(adj2),
            kind=kind,
            name=rng.choice(names),
            place=rng.choice(PLACES),
            setting=rng.choice(SETTINGS),
            pron=pron,
            Pron=pron.capitalize(),
        )
        openings[opening] = None
    return list(openings)


def build(args: argparse.Namespace) -> None:
    started = time.time()
    rng = random.Random(args.seed)
    openings = draw_openings(args.n_train + args.n_heldout, rng)
    train, heldout = openings[: args.n_train], openings[args.n_train :]
    assert not set(train) & set(heldout)

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, pad_token_id=tokenizer.pad_token_id)
    samples = sample(
        model,
        tokenizer,
        train,
        num_samples=2,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    scores = vader_compound([s.text for s in samples])

    rows, skipped = [], 0
    for i, opening in enumerate(train):
        a, b = samples[2 * i], samples[2 * i + 1]
        score_a, score_b = scores[2 * i], scores[2 * i + 1]
        if abs(score_a - score_b) < args.min_gap:
            skipped += 1
            continue
        (win, win_score), (lose, lose_score) = sorted(
            [(a, score_a), (b, score_b)], key=lambda pair: pair[1], reverse=True
        )
        rows.append(
            {
                "prompt": opening,
                "chosen": win.text,
                "rejected": lose.text,
                "prompt_ids": win.prompt_ids,
                "chosen_ids": win.completion_ids,
                "rejected_ids": lose.completion_ids,
                "chosen_score": win_score,
                "rejected_score": lose_score,
            }
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(out / "heldout_openings.json", "w") as f:
        json.dump(heldout, f, indent=1)
        f.write("\n")

    chosen_mean, _ = mean_and_stderr([r["chosen_score"] for r in rows])
    rejected_mean, _ = mean_and_stderr([r["rejected_score"] for r in rows])
    all_mean, _ = mean_and_stderr(scores)
    stats = {
        "pairs": len(rows),
        "skipped": skipped,
        "chosen_mean": chosen_mean,
        "rejected_mean": rejected_mean,
        "all_mean": all_mean,
    }
    (out / "README.md").write_text(_readme(args, stats))
    print(
        f"{len(train)} training openings -> {len(rows)} pairs ({skipped} skipped: |score gap| < "
        f"{args.min_gap}); {len(heldout)} held-out openings\n"
        f"mean VADER compound: chosen {chosen_mean:+.3f}, rejected {rejected_mean:+.3f}, "
        f"all samples {all_mean:+.3f}\nwrote {out} in {time.time() - started:.1f}s"
    )


def _readme(args: argparse.Namespace, stats: dict) -> str:
    return f"""# Demo preference data

Built once by `scripts/build_demo_pairs.py` (output committed; `alignkit demo` does not rebuild it):

    python scripts/build_demo_pairs.py --seed {args.seed} --n-train {args.n_train} \\
        --n-heldout {args.n_heldout} --min-gap {args.min_gap}

- Openings: {args.n_train + args.n_heldout} distinct children's-story openings drawn at random (seed
  {args.seed}) from templates (character, name, place, first action): the first {args.n_train} for
  training, the other {args.n_heldout} held out (`heldout_openings.json`, no overlap).
- Continuations: the shipped TinyStories-656K model, 2 per training opening, {args.max_new_tokens} new
  tokens at most, temperature {args.temperature}, full softmax (no top-k / top-p), seed {args.seed}
  (`alignkit.generation.sampling.sample`).
- Labels (AI feedback): VADER compound sentiment of each continuation; the more positive one is
  `chosen`. Pairs whose scores differ by less than {args.min_gap} were skipped: {stats["skipped"]} of
  {args.n_train}, leaving **{stats["pairs"]} pairs** in `pairs.jsonl`.
- Mean VADER compound: chosen {stats["chosen_mean"]:+.3f}, rejected {stats["rejected_mean"]:+.3f}
  (all sampled continuations {stats["all_mean"]:+.3f}).
- `prompt_ids` is the tokenizer's encoding of the opening (BOS first); `chosen_ids` and `rejected_ids`
  are the sampled ids exactly (ending with EOS, id 2, when the model ended the story). Train on these
  ids: this tokenizer does not give them back from the decoded text.
- The model ends a story by spelling out `<|end_story|>` in ordinary pieces and then emitting EOS, so a
  few texts end with that literal string.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="base model (path or hub name)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing openings and sampling")
    parser.add_argument("--n-train", type=int, default=400, help="training openings (one pair each)")
    parser.add_argument("--n-heldout", type=int, default=64, help="held-out evaluation openings")
    parser.add_argument("--min-gap", type=float, default=0.05, help="skip pairs with a smaller score gap")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per continuation")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    build(parser.parse_args())


if __name__ == "__main__":
    main()
