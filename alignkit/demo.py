"""`alignkit demo`: RLAIF in a few CPU minutes, measured.

The policy is the real pretrained TinyStories-656K model shipped with the package. The preference pairs
(alignkit/assets/demo/pairs.jsonl, built once by scripts/build_demo_pairs.py) are the model's own samples:
two continuations per story opening, the one the VADER sentiment analyser scores more positive is
`chosen`. The demo runs DPO against the frozen base, reloads the saved model from disk (evaluate what you
ship), and compares base and aligned on held-out openings with the same sampling seeds through
`alignkit.evaluation.compare.compare_policies` with a VADER reward set: mean VADER sentiment before and after with the
paired difference, win rate, KL to the base, the base model's perplexity on each policy's samples
(fluency), and samples side by side (docs/evaluation.md explains every number).
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.config.tools import DemoConfig


def run_demo(cfg: DemoConfig) -> dict:
    """Train, reload, compare, print; returns the report (also written to output_dir/demo_report.json
    and, as Markdown, demo_report.md)."""
    from alignkit.algorithms.dpo import train
    from alignkit.config.preference import DPOConfig
    from alignkit.evaluation.compare import compare_policies, format_markdown, write_reports
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.report.build import report_after_run
    from alignkit.rewards import RewardSet

    dpo = DPOConfig(
        model=cfg.model,
        data=cfg.data,
        output_dir=cfg.output_dir,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        beta=cfg.beta,
        seed=cfg.seed,
        max_length=256,
        max_prompt_length=128,
        warmup_ratio=0.1,
        lr_scheduler="cosine",
        eval_steps=10**9,
        save_steps=50,
        progress=cfg.progress,
        report=False,  # written below, once the evaluation is on disk too
        overwrite=cfg.overwrite,
    )
    print(f"alignkit demo: DPO on {cfg.data} with {cfg.model}")
    final = train(dpo)

    # Evaluate what was saved, not the trainer's in-memory object.
    tokenizer = load_tokenizer(str(final))
    base = load_causal_lm(cfg.model, pad_token_id=tokenizer.pad_token_id)
    aligned = load_causal_lm(str(final), pad_token_id=tokenizer.pad_token_id)
    openings = json.loads(Path(cfg.heldout).read_text())[: cfg.num_heldout]
    report = compare_policies(
        base,
        aligned,
        tokenizer,
        openings,
        rewards=RewardSet.from_specs([{"type": "vader"}]),
        num_samples=cfg.samples_per_opening,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed + 1,
    )
    report["models"] = {"base": cfg.model, "aligned": str(final)}
    print(format_markdown(report))
    json_path, md_path = write_reports(report, cfg.output_dir, stem="demo_report")
    print(f"report written to {json_path} and {md_path}")
    report_after_run(cfg.output_dir, force=True)  # prints "report written to .../report.html"
    return report
