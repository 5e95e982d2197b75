"""Build examples/data/hh_summary_prompts.jsonl: HH-dialogue summarisation prompts for the FLAN-T5 PPO case
study (examples/ppo/flan_t5_hh_summaries.yaml), from the HH sample shipped in examples/data.

Each row is {"prompt": "Summarize the following conversation.\n\n<dialogue>"}, the dialogue being the
`chosen` transcript of one pair (its Human/Assistant turns as in the data), kept when it is at most
`--max-chars` long so that it fits FLAN-T5's 512-token input. The first `--rows` such rows in file order.

    python scripts/build_summary_prompts.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Summarize the following conversation."


def build(source: Path, rows: int, max_chars: int) -> list[dict]:
    """The first `rows` dialogues of `source` no longer than `max_chars`, as summarisation prompts."""
    out = []
    with open(source) as f:
        for line in f:
            dialogue = json.loads(line)["chosen"].strip()
            if len(dialogue) <= max_chars:
                out.append({"prompt": f"{INSTRUCTION}\n\n{dialogue}"})
            if len(out) == rows:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO / "examples/data/hh-harmless-1600.jsonl")
    parser.add_argument("--output", type=Path, default=REPO / "examples/data/hh_summary_prompts.jsonl")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-chars", type=int, default=1200)
    args = parser.parse_args()
    rows = build(args.source, args.rows, args.max_chars)
    args.output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts written to {args.output}")


if __name__ == "__main__":
    main()
