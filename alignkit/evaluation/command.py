"""`alignkit eval`: a base and an aligned model sampled on the same held-out prompts with the same seeds,
compared (`evaluation.compare`), written as eval_report.json / .md and the run's report page.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch

from alignkit.config.load import ConfigError, validate
from alignkit.config.tools import EvalConfig
from alignkit.data.prompts import encode_prompt, load_prompt_rows
from alignkit.evaluation.compare import compare_policies, write_reports
from alignkit.generation.resolve import resolve_backend
from alignkit.models.load import check_model_source
from alignkit.rewards.compose import RewardSet
from alignkit.rewards.registry import parse_spec
from alignkit.training.rundir import claim_output_dir


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


def vllm_sampler(cfg: EvalConfig, base, aligned, tokenizer, rows):
    """generation.backend=vllm: one engine, started from base_model's weights (an adapter folder's base) and
    synced to each model before it samples, so the two must share their weights' names and shapes."""
    from alignkit.generation.vllm import full_weights
    from alignkit.rollout import sampler_for

    shapes = [{name: tuple(t.shape) for name, t in full_weights(m)} for m in (base, aligned)]
    if shapes[0] != shapes[1]:
        raise ValueError(
            f"generation.backend=vllm samples both models with one engine, synced to each; base_model "
            f"({cfg.base_model}) and model ({cfg.model}) have different weights' names or shapes: use "
            "generation.backend=hf"
        )
    prompt_ids = [encode_prompt(tokenizer, r.prompt) for r in rows]
    return sampler_for(cfg.generation, cfg.base_model, base, tokenizer, prompt_ids)


def run(cfg: EvalConfig) -> dict:
    """`alignkit eval`: validates, loads, compares, writes output_dir/eval_report.{json,md} and report.html,
    prints the Markdown; returns the report (with the resolved config under "config")."""
    from alignkit.models.load import load_causal_lm, load_tokenizer

    _check(cfg)
    read_prompts(cfg.prompts)  # bad rows fail before any model is loaded
    for key in ("base_model", "model"):
        check_model_source(getattr(cfg, key), key)
    # generation.backend: auto is hf here (EvalConfig: both models share per-sample seeds); saved in the report.
    backend = "hf" if cfg.generation.backend == "auto" else cfg.generation.backend
    if backend == "vllm":  # refused now, with the reason, for a model it cannot serve
        resolve_backend(backend, [cfg.base_model, cfg.model])
    cfg = replace(cfg, generation=replace(cfg.generation, backend=backend))
    claim_output_dir(cfg.output_dir, overwrite=cfg.overwrite, patterns=("eval_report.json", "eval_report.md"))
    rewards = RewardSet.from_specs(cfg.rewards)

    tokenizer = load_tokenizer(cfg.model)
    template = {"system_prompt": cfg.system_prompt, "chat_template_kwargs": cfg.chat_template_kwargs}
    rows = load_prompt_rows(cfg.prompts, tokenizer=tokenizer, **template, columns=rewards.columns)
    rows = rows[: cfg.num_prompts or None]
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
    sampler = None
    if backend == "vllm":  # one engine from base_model's weights, synced to each model in turn
        sampler = vllm_sampler(cfg, base, aligned, tokenizer, rows)
    report = compare_policies(
        base,
        aligned,
        tokenizer,
        [r.prompt for r in rows],  # chat rows: rendered in the aligned model's template
        rewards=rewards,
        reward_prompts=[r.reward_input for r in rows],
        reward_columns=[r.columns for r in rows],
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature,
        top_k=cfg.generation.top_k,
        top_p=cfg.generation.top_p,
        seed=cfg.seed,
        batch_size=cfg.generation.batch_size,
        scoring_batch_size=cfg.scoring_batch_size,
        num_examples=cfg.num_examples,
        sampler=sampler,
    )
    report["models"] = {"base": cfg.base_model, "aligned": cfg.model}
    report["config"] = asdict(cfg)
    json_path, md_path = write_reports(report, cfg.output_dir)
    print(md_path.read_text(encoding="utf-8"))
    print(f"reports written to {json_path} and {md_path}")
    from alignkit.report.build import report_after_run

    report_after_run(cfg.output_dir)  # the HTML page, with the before/after chart
    return report
