"""What every training command's config shares: TrainConfig (the fields every training command has, under
the same names), the settings sections it and its subclasses hold (LoRA, the reference model), and the names
of the dtypes, mixed-precision modes and reference modes those settings accept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from alignkit.config.load import FRACTION, above, at_least, between

DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
"""Weights dtypes a `dtype` setting accepts (alignkit.models.load.DTYPES maps each to its torch dtype)."""
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
REFERENCE_MODES = ("precomputed", "copy", "adapter")


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft)."""

    enabled: bool = False
    """Train a LoRA adapter instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str = "all-linear"
    """Comma-separated module names to adapt, or 'all-linear'."""
    merge: bool = False
    """Save the final model with the adapter merged into full weights (else the adapter alone)."""

    ranges: ClassVar[dict] = {"r": at_least(1), "alpha": above(0), "dropout": between(0, 1, high_open=True)}


@dataclass
class ReferenceSettings:
    """The frozen reference model that a KL-regularised objective measures the policy against."""

    mode: str = "precomputed"
    """precomputed (its log-probs computed once before training, no model held), copy (a frozen copy
    in memory) or adapter (with lora.enabled: the base model with the adapter switched off)."""
    model: str | None = None
    """Reference weights when different from `model` (precomputed / copy); default: the policy's start."""

    ranges: ClassVar[dict] = {"mode": REFERENCE_MODES}


def max_length_above_prompt(cfg) -> str | None:
    """A max_prompt_length that is set must leave max_length room for a completion. (Left at its default
    with a short max_length, prompts are still cut to max_prompt_length and completions to the rest; the
    configs that sample, whose completions are generation.max_new_tokens long, do not use max_length.)"""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}["max_prompt_length"]
    if hasattr(cfg, "generation") or cfg.max_prompt_length == default:
        return None
    if cfg.max_length > cfg.max_prompt_length:
        return None
    return (
        f"'max_length' ({cfg.max_length}) must be greater than 'max_prompt_length' ({cfg.max_prompt_length}), "
        "leaving room for the completion"
    )


@dataclass
class TrainConfig:
    """Fields shared, with the same names, by every training command."""

    model: str = ""
    """Policy model: a Hugging Face hub name or a local directory."""
    tokenizer: str | None = None
    """Tokenizer to load (default: the model's)."""
    data: str = ""
    """Training rows: a .jsonl/.json/.parquet file or a Hugging Face dataset name."""
    data_split: str = "train"
    """Split to read when `data` is a Hugging Face dataset name."""
    eval_data: str | None = None
    """Evaluation rows (file or dataset name); default: `eval_fraction` of `data`."""
    eval_split: str = "test"
    """Split to read when `eval_data` is a Hugging Face dataset name."""
    eval_fraction: float = 0.0
    """Fraction of `data` held out for evaluation when `eval_data` is not given (0 = no eval)."""
    output_dir: str = "runs/out"
    """Where metrics, checkpoints, the resolved config and the final model are written."""
    max_steps: int = -1
    """Optimizer steps to run; -1 (or 0) = derive from `epochs`."""
    epochs: float = 1.0
    """Passes over the training rows (used when max_steps is -1)."""
    batch_size: int = 8
    """Rows (pairs for preference data) per micro-batch on each device."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule after warm-up: linear, cosine or constant."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = no clipping)."""
    max_length: int = 512
    """Maximum tokens of prompt + completion; completions are truncated from the right."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; prompts are truncated from the left, keeping the end and the BOS (commands
    that sample from prompt rows refuse a longer conversational prompt at its row instead)."""
    system_prompt: str | None = None
    """Conversational rows: a system message put first in every conversation without one (rows with their
    own keep theirs), rendered by the chat template; an error on rows that are all text."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Conversational rows: extra variables for the chat template, e.g. {enable_thinking: false} (Qwen3),
    passed to every apply_chat_template call; an error on rows that are all text or without a template."""
    seed: int = 42
    """Seed for initialisation, data order and sampling."""
    shuffle: bool = True
    """Shuffle the rows each epoch (false: file order, e.g. for curriculum or side-by-side benchmarks)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""
    mixed_precision: str = "auto"
    """Autocast through accelerate: auto (bf16 where the device computes it natively: CUDA with bf16, CPUs
    with AVX512-BF16 or AMX; else fp32), no, bf16 or fp16."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers: eager, sdpa, flash_attention_2 (default: transformers')."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own code. Off unless you trust the source."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (lora.enabled=true to train an adapter)."""
    logging_steps: int = 1
    """Write train metrics every this many optimizer steps."""
    eval_steps: int = 50
    """Evaluate every this many optimizer steps (and at the end)."""
    save_steps: int = 100
    """Write a checkpoint every this many optimizer steps (0 = only on interrupt)."""
    save_total_limit: int = 2
    """Checkpoints to keep (older ones are deleted)."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir with the same data order."""
    overwrite: bool = False
    """Replace a run already in output_dir (its files are deleted first); without it, or resume, that is an error."""
    on_bad_rows: str = "refuse"
    """refuse (stop, listing every bad row) or skip (drop them, listed in the log and output_dir/dropped_rows.jsonl)."""
    logprob_chunk_size: int = 1024
    """Completion tokens projected to the vocabulary at once (bounds the logits memory)."""
    cache_dir: str | None = None
    """Where tokenised data and reference log-probs are cached (default: output_dir/cache)."""
    progress: bool = True
    """Show a console progress bar."""
    report: bool = True
    """Write output_dir/report.html (curves, tables, config; docs/reports.md) when the run ends."""
    report_to: str = "none"
    """Also log metrics to an experiment tracker through accelerate: none, tensorboard or wandb."""

    ranges: ClassVar[dict] = {
        "eval_fraction": between(0, 1, high_open=True),
        "max_steps": at_least(0, -1),
        "epochs": above(0),
        "batch_size": at_least(1),
        "grad_accum": at_least(1),
        "lr": above(0),
        "lr_scheduler": ("linear", "cosine", "constant"),
        "warmup_ratio": FRACTION,
        "weight_decay": at_least(0),
        "max_grad_norm": at_least(0),
        "max_length": at_least(1),
        "max_prompt_length": at_least(1),
        "seed": between(0, 2**32 - 1),
        "dtype": DTYPE_NAMES,
        "mixed_precision": MIXED_PRECISION,
        "logging_steps": at_least(1),
        "eval_steps": at_least(1),
        "save_steps": at_least(0),
        "save_total_limit": at_least(1),
        "logprob_chunk_size": at_least(1),
        "on_bad_rows": ("refuse", "skip"),
    }
    relations: ClassVar[tuple] = (max_length_above_prompt,)
