"""Unpaired preference optimisation: KTO (and BCO) on single completions labelled desirable or undesirable.

    alignkit kto model=PATH data=rows.jsonl output_dir=out batch_size=8

Rows are {prompt, completion, label: true/false}, text or conversational (alignkit.data.rows). Reads top
to bottom: data -> policy -> reference log-probs -> loss -> fit -> save.

KTO measures each completion's implicit reward against a reference point z0, the policy's KL from the
reference, estimated in every micro-batch from mismatched pairs: row i's prompt with row i−1's completion
(`mismatched_partners`). So a micro-batch needs at least 2 rows, and an evaluation batch of one row joins
the previous one. With reference=precomputed the reference log-probs of those pairs are computed once,
before training, like the rest: the data order is fixed by the seed (`DataOrder`), so every pair the run's
micro-batches will form is known in advance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.algorithms.dpo import (
    attach_precomputed_reference,
    check_reference_settings,
    reference_forward,
    setup_reference,
)
from alignkit.config import ConfigError, KTOConfig
from alignkit.data.collate import collate_unpaired, mismatched_partners
from alignkit.data.prepare import prepare_unpaired_data
from alignkit.logprobs import completion_logps
from alignkit.losses import RunningMean, check_params, get_unpaired_loss
from alignkit.losses.unpaired import UNPAIRED_LOSSES, kto_reference_point
from alignkit.models import add_lora, load_policy, load_tokenizer
from alignkit.runtime import (
    data_order,
    fit,
    save_final,
    start_run,
    total_steps,
    used_indices,
)

FIELDS = ("prompt_ids", "completion_ids")


def completion_sums(model, batch: dict, chunk_size: int) -> dict:
    """{"completion": (B,) log-prob sums of the batch's completions, and "mismatched": (B,) of its
    mismatched pairs when the batch holds them} (rows [B:] of the batch, computed without gradient:
    z0 is a constant in the loss)."""
    B = batch["label"].shape[0]

    def sums(rows: slice) -> torch.Tensor:
        out = completion_logps(
            model,
            batch["input_ids"][rows],
            batch["attention_mask"][rows],
            batch["completion_mask"][rows],
            chunk_size=chunk_size,
        )
        return out.sum

    logps = {"completion": sums(slice(0, B))}
    if batch["input_ids"].shape[0] > B:
        with torch.no_grad():
            logps["mismatched"] = sums(slice(B, None))
    return logps


def eval_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive chunks of `batch_size` indices; a last chunk of one row joins the previous chunk."""
    chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] = chunks[-1] + last
    return chunks


def mismatched_examples(examples: list[dict], batches: list[list[int]]) -> list[dict]:
    """One example per distinct mismatched pair the `batches` (lists of indices into `examples`) form:
    {prompt_ids, completion_ids, label, pair: (prompt row, completion row)}."""
    pairs = {(idx[p], idx[q]) for idx in batches for p, q in enumerate(mismatched_partners(len(idx)))}
    return [
        {
            "prompt_ids": examples[a]["prompt_ids"],
            "completion_ids": examples[b]["completion_ids"],
            "label": False,
            "pair": (a, b),
        }
        for a, b in sorted(pairs)
    ]


def class_sums(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, float]:
    """Sums and counts of the implicit rewards of each class; `summarise` turns them into means."""
    return {
        "rewards/desirable_sum": float(rewards[desirable].sum()),
        "rewards/undesirable_sum": float(rewards[~desirable].sum()),
        "count/desirable": float(desirable.sum()),
        "count/undesirable": float((~desirable).sum()),
    }


def summarise(record: dict) -> dict:
    """Each class's mean implicit reward (where the step saw the class) and their difference, the
    desirable-vs-undesirable separation."""
    out = dict(record)
    for c in ("desirable", "undesirable"):
        if record[f"count/{c}"] > 0:
            out[f"rewards/{c}"] = record[f"rewards/{c}_sum"] / record[f"count/{c}"]
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["rewards/margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    return out


def train(cfg: KTOConfig) -> Path:
    """Train a policy on labelled completions; returns the folder of the saved final model."""
    check_reference_settings(cfg)
    spec = get_unpaired_loss(cfg.loss)
    try:
        check_params(cfg.loss, {p: getattr(cfg, p) for p in spec.params}, UNPAIRED_LOSSES)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    needs_kl = "kl" in spec.inputs
    if needs_kl and cfg.batch_size < 2:
        raise ConfigError(
            f"loss '{cfg.loss}' estimates its KL reference point from mismatched prompt/completion pairs "
            f"within a micro-batch, which needs batch_size >= 2 (got {cfg.batch_size})"
        )
    accelerator, log, output_dir = start_run(cfg)

    # Data: validated and tokenised before any model is loaded, so bad rows fail fast.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_unpaired_data(cfg, tokenizer, log)
    if needs_kl and len(eval_examples) == 1:
        raise ValueError("the evaluation set has 1 row; KTO's KL estimate needs at least 2 (or no eval)")
    for examples in (train_examples, eval_examples):
        for i, e in enumerate(examples):
            e["index"] = i  # names the rows of a mismatched pair
    n_d = sum(e["label"] for e in train_examples)
    n_u = len(train_examples) - n_d
    ratio = cfg.desirable_weight * n_d / max(cfg.undesirable_weight * n_u, 1e-12)
    log(f"{n_d} desirable and {n_u} undesirable rows; λ_D·n_D / (λ_U·n_U) = {ratio:.3g}")
    if n_d and n_u and not 1.0 <= ratio <= 4 / 3:
        log("  KTO's authors recommend weights that put this ratio in [1, 4/3] (docs/objectives.md)")

    model = load_policy(cfg, tokenizer.pad_token_id, accelerator.device)

    # The micro-batches `fit` will draw (the same seeded order: no `lengths`), for the mismatched pairs.
    order = data_order(cfg, len(train_examples), accelerator)
    train_batches = [mb for s in range(total_steps(cfg, order)) for mb in order.micro_batches(s)]
    kl_reference = {"train": {}, "eval": {}}  # (prompt row, completion row) -> reference log-prob sum

    def sums(m, batch: dict) -> dict:
        return completion_sums(m, batch, cfg.logprob_chunk_size)

    def make_collate(split: str, mismatched: bool):
        def collate(examples: list[dict]) -> dict:
            batch = collate_unpaired(examples, tokenizer.pad_token_id, mismatched)
            if "ref_completion" in examples[0]:
                batch["ref"] = torch.tensor([e["ref_completion"] for e in examples])
                if mismatched:
                    partners = mismatched_partners(len(examples))
                    pairs = [(e["index"], examples[j]["index"]) for e, j in zip(examples, partners)]
                    batch["ref_mismatched"] = torch.tensor([kl_reference[split][p] for p in pairs])
            return batch

        return collate

    def precompute(ref_model) -> None:
        used = [train_examples[i] for i in used_indices(cfg, len(train_examples), accelerator)]
        splits = {"train": used, "eval": eval_examples}
        plain = make_collate("train", mismatched=False)
        attach_precomputed_reference(cfg, ref_model, splits, accelerator, plain, sums, FIELDS, log)
        if not needs_kl:
            return
        batches = {"train": train_batches, "eval": eval_batches(len(eval_examples), cfg.batch_size)}
        for split, examples in (("train", train_examples), ("eval", eval_examples)):
            pairs = mismatched_examples(examples, batches[split]) if examples else []
            attach_precomputed_reference(
                cfg, ref_model, {f"{split}-mismatched": pairs}, accelerator, plain, sums, FIELDS, log
            )
            kl_reference[split] = {p["pair"]: p["ref_completion"] for p in pairs}

    reference, setup_metrics = setup_reference(cfg, model, accelerator, precompute)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    model.train()

    def reference_for(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "ref" in batch:
            return batch["ref"], batch.get("ref_mismatched")
        ref = reference_forward(cfg, model, reference, accelerator, sums, batch)
        return ref["completion"], ref.get("mismatched")

    reward_mean = RunningMean()  # bco's δ: mean implicit reward of all previous training batches

    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        policy = sums(model, batch)
        ref, ref_mismatched = reference_for(batch)
        params = {p: getattr(cfg, p) for p in spec.params}
        if needs_kl:  # z0: detached, averaged over processes, clamped at 0
            params["kl"] = kto_reference_point(
                policy["mismatched"], ref_mismatched, lambda t: accelerator.reduce(t, "mean")
            )
        if "delta" in spec.inputs:
            params["delta"] = reward_mean.mean
        out = spec.fn(policy["completion"], ref, batch["label"], **params)
        if "delta" in spec.inputs and model.training:  # evaluation does not move δ
            reward_mean.update(accelerator.gather(out.rewards))
        metrics = {
            "loss": float(out.losses.detach().mean()),
            **class_sums(out.rewards, batch["label"]),
            "logps/completion": float(policy["completion"].detach().mean()),
            **out.metrics,
        }
        return out.losses.mean(), metrics

    def evaluate() -> dict:
        # Per-row means are weighted by the batch's rows; class sums and counts are averaged per batch,
        # as in training, so that `summarise` gives each class's mean over the whole set.
        collate, totals = make_collate("eval", needs_kl), {}
        batches = eval_batches(len(eval_examples), cfg.batch_size)
        for idx in batches:
            examples = [eval_examples[i] for i in idx]
            batch = {k: v.to(accelerator.device) for k, v in collate(examples).items()}
            _, metrics = loss_fn(batch)
            for k, v in metrics.items():
                per_row = not (k.endswith("_sum") or k.startswith("count/"))
                totals[k] = totals.get(k, 0.0) + (
                    v * len(idx) / len(eval_examples) if per_row else v / len(batches)
                )
        return summarise(totals)

    fit(
        cfg,
        accelerator,
        model,
        train_examples,
        make_collate("train", needs_kl),
        loss_fn,
        evaluate if eval_examples else None,
        setup_metrics=setup_metrics,
        state=reward_mean if "delta" in spec.inputs else None,
        summarise=summarise,
    )

    return save_final(accelerator, model, tokenizer, output_dir, cfg.lora.merge, log)
