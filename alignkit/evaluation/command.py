"""`alignkit eval`: a base and an aligned model sampled on the same held-out prompts with the same seeds,
compared (`evaluation.compare`), written as eval_report.json / .md and the run's report page.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from alignkit.config.load import ConfigError, at_least, between, validate
from alignkit.data.prompts import load_prompt_rows
from alignkit.evaluation.compare import compare_policies, write_reports
from alignkit.models.load import DTYPES, check_model_source
from alignkit.rewards.compose import RewardSet
from alignkit.rewards.registry import parse_spec
from alignkit.training.rundir import claim_output_dir


@dataclass
class EvalConfig:
    """Compare a base and an aligned model on held-out prompts, scored by one or more reward sources."""

    base_model: str = ""
    """The model before alignment: a Hugging Face hub name or a local directory."""
    model: str = ""
    """The aligned model (e.g. a run's output_dir/final); its tokenizer is used for both."""
    prompts: str = ""
    """Held-out prompts: a .jsonl of {"prompt": ...} rows, or a .json list of strings."""
    num_prompts: int = 0
    """Use the first this many prompts (0 = all)."""
    rewards: list[dict] = field(default_factory=lambda: [{"type": "vader"}])
    """Reward sources scoring both sample sets: [{type: vader|length|regex|classifier|judge, ...}]."""
    num_samples: int = 4
    """Samples per prompt and policy (sample j of both policies shares its seed)."""
    max_new_tokens: int = 48
    """Longest completion, in tokens."""
    system_prompt: str | None = None
    """Conversational prompt rows: a system message put first in every conversation without one (rows
    with their own keep theirs); rendered by the policy's chat template."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Conversational prompt rows: extra variables for the chat template, e.g. {enable_thinking: false}
    (Qwen3), passed to apply_chat_template."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy); the KL estimate needs 1 and no top_k / top_p."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (none = off)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens with this much probability (none = off)."""
    seed: int = 0
    """Seed of the (shared) sampling noise."""
    batch_size: int = 32
    """Sequences per generation and scoring batch."""
    output_dir: str = "runs/eval"
    """Where eval_report.json and eval_report.md are written."""
    num_examples: int = 4
    """Prompts shown side by side in the sample table (the first sample of each)."""
    dtype: str = "float32"
    """Weights dtype of both models: float32, bfloat16, float16 or auto."""
    overwrite: bool = False
    """Replace the eval_report.json / .md already in output_dir (without it, they are an error)."""

    ranges: ClassVar[dict] = {
        "num_prompts": at_least(0),
        "num_samples": at_least(1),
        "max_new_tokens": at_least(1),
        "temperature": at_least(0),
        "top_k": at_least(1),
        "top_p": between(0, 1, low_open=True),
        "batch_size": at_least(1),
        "num_examples": at_least(0),
        "dtype": tuple(DTYPES),
    }


def read_prompts(
    path: str, tokenizer=None, *, system_prompt: str | None = None, chat_template_kwargs: dict | None = None
) -> list[str]:
    """Prompts from a .jsonl (or .json array) of prompt rows ({"prompt": str}, or chat messages rendered
    with `tokenizer`'s template, `system_prompt` and `chat_template_kwargs`), or a .json list of strings
    (alignkit.data.prompts). Every bad row is reported at once as file:line: field 'prompt': problem."""
    template = {"system_prompt": system_prompt, "chat_template_kwargs": chat_template_kwargs}
    return [row.prompt for row in load_prompt_rows(path, tokenizer=tokenizer, **template)]


def _check(cfg: EvalConfig) -> None:
    missing = [key for key in ("base_model", "model", "prompts") if not getattr(cfg, key)]
    if missing:
        raise ConfigError(f"set {', '.join(f'{k}=...' for k in missing)} (see alignkit eval --help)")
    validate(cfg)
    if not isinstance(cfg.rewards, list) or not cfg.rewards:
        raise ConfigError("'rewards': expected a non-empty list of reward sources, e.g. [{type: vader}]")
    for i, spec in enumerate(cfg.rewards):
        parse_spec(spec, f"rewards[{i}]")  # cheap: a bad spec fails before any model is loaded


def run(cfg: EvalConfig) -> dict:
    """`alignkit eval`: validates, loads, compares, writes output_dir/eval_report.{json,md} and report.html,
    prints the Markdown; returns the report (with the resolved config under "config")."""
    from alignkit.models.load import load_causal_lm, load_tokenizer

    _check(cfg)
    read_prompts(cfg.prompts)  # bad rows fail before any model is loaded
    for key in ("base_model", "model"):
        check_model_source(getattr(cfg, key), key)
    claim_output_dir(cfg.output_dir, overwrite=cfg.overwrite, patterns=("eval_report.json", "eval_report.md"))
    rewards = RewardSet.from_specs(cfg.rewards)

    tokenizer = load_tokenizer(cfg.model)
    template = {"system_prompt": cfg.system_prompt, "chat_template_kwargs": cfg.chat_template_kwargs}
    rows = load_prompt_rows(cfg.prompts, tokenizer=tokenizer, **template)[: cfg.num_prompts or None]
    if load_tokenizer(cfg.base_model).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the tokenizers of base_model ({cfg.base_model}) and model ({cfg.model}) differ: the shared "
            "sampling noise and the KL need one vocabulary; compare models that share a tokenizer"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, aligned = (
        load_causal_lm(path, cfg.dtype, pad_token_id=tokenizer.pad_token_id, device=device)
        for path in (cfg.base_model, cfg.model)
    )
    report = compare_policies(
        base,
        aligned,
        tokenizer,
        [r.prompt for r in rows],  # chat rows: rendered in the aligned model's template
        rewards=rewards,
        reward_prompts=[r.reward_input for r in rows],
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        num_examples=cfg.num_examples,
    )
    report["models"] = {"base": cfg.base_model, "aligned": cfg.model}
    report["config"] = asdict(cfg)
    json_path, md_path = write_reports(report, cfg.output_dir)
    print(md_path.read_text(encoding="utf-8"))
    print(f"reports written to {json_path} and {md_path}")
    from alignkit.report.build import report_after_run

    report_after_run(cfg.output_dir)  # the HTML page, with the before/after chart
    return report
