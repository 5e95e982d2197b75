"""Offline DPO throughput and memory: alignkit vs TRL's DPOTrainer, same model, data and settings.

    pip install -e ".[bench]"            # trl, benchmark-only
    python benchmarks/dpo_vs_trl.py      # CPU fixture; prints a table and one JSON line

The CPU fixture: a seeded tiny Llama (hidden 256, 4 layers, ~5M parameters) with a 4,096-token BPE
tokenizer trained on the HH sample, the 1,600 HH pairs of examples/data (5 that do not split are
dropped by both sides' shared preparation), batch 8, max length 256, fp32. Both sides see the pairs in
the same (file) order, train sigmoid DPO with β 0.1 and the same learning rate, with gradient
checkpointing off, and each runs in its own process so that its peak RSS is its own.

--record appends the result (machine, command, date) to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HH = REPO / "examples" / "data" / "hh-harmless-1600.jsonl"


def build_fixture(root: Path) -> Path:
    """Tokenizer trained on the HH sample + seeded tiny Llama + the HH pairs split into prompt/chosen/rejected."""
    if (root / "done").exists():
        return root
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from alignkit.data.load import load_preference_rows

    root.mkdir(parents=True, exist_ok=True)
    data = load_preference_rows(str(HH))
    with open(root / "pairs.jsonl", "w") as f:
        for r in data.rows:
            f.write(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n")

    texts = [json.loads(line)[k] for line in open(HH) for k in ("chosen", "rejected")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(root / "model")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model", safe_serialization=True)
    (root / "done").write_text("ok")
    return root


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_alignkit(fixture: Path, args) -> dict:
    from alignkit.algorithms import dpo
    from alignkit.config.preference import DPOConfig

    out = fixture / "run-alignkit"
    cfg = DPOConfig(
        model=str(fixture / "model"),
        data=str(fixture / "pairs.jsonl"),
        output_dir=str(out),
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=0.1,
        max_length=args.max_length,
        max_prompt_length=args.max_length,  # like TRL: rows whose prompt fills max_length are dropped
        warmup_ratio=0.0,
        save_steps=0,
        progress=False,
        shuffle=False,
        cache_dir=str(out / f"cache-{time.time_ns()}"),  # fresh: the reference pass is timed
    )
    t0 = time.perf_counter()
    dpo.train(cfg)
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [m for m in metrics if m["split"] == "train"]
    return {
        "losses": [m["loss"] for m in train],
        "step_times": [m["step_time"] for m in train],
        "tokens": sum(m["tokens"] for m in train),
        "train_time": sum(m["step_time"] for m in train) + train[0].get("reference_time", 0.0),
        "wall_time": wall,
    }


def run_trl(fixture: Path, args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class SequentialDPOTrainer(DPOTrainer):
        """The same data order as alignkit's run (file order)."""

        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.t = [], [], None

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(fixture / "model")
    model = AutoModelForCausalLM.from_pretrained(fixture / "model")
    dataset = datasets.load_dataset("json", data_files=str(fixture / "pairs.jsonl"), split="train")
    config = DPOConfig(
        output_dir=str(fixture / "run-trl"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        beta=0.1,
        max_length=args.max_length,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=42,
        dataloader_num_workers=0,
    )
    timer = Timer()
    trainer = SequentialDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return {
        "losses": timer.losses,
        "step_times": timer.times,
        "tokens": None,
        "train_time": wall,
        "wall_time": wall,
    }


def side_main(side: str, fixture: Path, args) -> None:
    result = (run_alignkit if side == "alignkit" else run_trl)(fixture, args)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result))


def run_side(side: str, fixture: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--fixture",
        str(fixture),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{side} run failed ({proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def summarise(name: str, r: dict, args) -> dict:
    pairs = args.steps * args.batch_size
    return {
        "side": name,
        "pairs/s": pairs / r["train_time"],
        "tokens/s": (r["tokens"] / r["train_time"]) if r["tokens"] else None,
        "median_step_s": statistics.median(r["step_times"]),
        "train_time_s": r["train_time"],
        "peak_rss_mib": r["peak_rss_mib"],
        "first_loss": r["losses"][0],
        "last_loss": r["losses"][-1],
        "mean_last5_loss": statistics.mean(r["losses"][-5:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--fixture", type=Path, default=HERE / ".fixture")
    p.add_argument("--side", choices=["alignkit", "trl"])
    p.add_argument("--only", choices=["alignkit", "trl"], help="run one side only")
    p.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.side:
        return side_main(args.side, args.fixture, args)

    fixture = build_fixture(args.fixture)
    load_before = os.getloadavg()[0]  # other work on the machine skews timings: report it
    sides = [args.only] if args.only else ["trl", "alignkit"]
    rows = [summarise(s, run_side(s, fixture, args), args) for s in sides]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.system()}"
    print(
        f"\nDPO, CPU fp32, tiny Llama 5M, HH pairs, batch {args.batch_size}, max length {args.max_length}, "
        f"{args.steps} steps ({machine})"
    )
    print(
        f"{'':>10} {'pairs/s':>9} {'tokens/s':>9} {'median step s':>14} {'peak RSS MiB':>13} "
        f"{'first loss':>11} {'last-5 loss':>12}"
    )
    for r in rows:
        tok = f"{r['tokens/s']:.0f}" if r["tokens/s"] else "-"
        print(
            f"{r['side']:>10} {r['pairs/s']:>9.2f} {tok:>9} {r['median_step_s']:>14.3f} "
            f"{r['peak_rss_mib']:>13.0f} {r['first_loss']:>11.4f} {r['mean_last5_loss']:>12.4f}"
        )
    print(f"1-minute load average before the runs: {load_before:.2f}")
    summary = {
        "machine": machine,
        "date": date.today().isoformat(),
        "load_before": load_before,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "results": rows,
    }
    if len(rows) == 2:
        summary["speedup"] = rows[1]["pairs/s"] / rows[0]["pairs/s"]
    print(json.dumps(summary))
    if args.record:
        command = "python benchmarks/dpo_vs_trl.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(
                f"\n## {summary['date']} — `{command.strip()}`\n\nMachine: {machine}\n\n```json\n"
                f"{json.dumps(summary, indent=1)}\n```\n"
            )


if __name__ == "__main__":
    main()
