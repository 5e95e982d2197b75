"""Unpaired preference optimisation: KTO (and BCO) on single completions labelled desirable or undesirable.

    alignkit kto model=PATH data=rows.jsonl output_dir=out batch_size=8

Rows are {prompt, completion, label: true/false}, text or conversational (alignkit.data.parse). Reads top
to bottom: data -> policy -> reference log-probs -> loss -> fit -> save.

KTO measures each completion's implicit reward against a reference point z0, the policy's KL from the
reference, estimated in every micro-batch from mismatched pairs: row i's prompt with row i−1's completion
(`mismatched_partners`). So a micro-batch needs at least 2 rows, and an evaluation batch of one row joins
the previous one. With reference=precomputed the reference log-probs of those pairs are computed once,
before training, like the rest: the data order is fixed by the seed (`DataOrder`), so every pair the run's
micro-batches will form is known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config.checks import check_reference_settings
from alignkit.config.load import ConfigError
from alignkit.config.preference import KTOConfig
from alignkit.data.collate import collate_unpaired, mismatched_partners
from alignkit.data.prepare import prepare_unpaired_data
from alignkit.logprobs.completion import completion_logps
from alignkit.losses import LossSpec, RunningMean, check_params, get_unpaired_loss
from alignkit.losses.unpaired import UNPAIRED_LOSSES, kto_reference_point
from alignkit.models.load import BatchForward, load_policy, load_tokenizer
from alignkit.models.lora import add_lora
from alignkit.models.reference import Reference, attach_precomputed_reference, setup_reference
from alignkit.training.loop import fit
from alignkit.training.order import data_order, total_steps, used_indices
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import as_numbers

FIELDS = ("prompt_ids", "completion_ids")


def completion_sums(model, batch: dict, chunk_size: int = 1024) -> dict:
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


def class_shares(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row means that stay exact when averaged over batches of any size: each class's share of the
    rows and the mean of reward x (row in class); `summarise` divides one by the other."""
    d = desirable.float()
    r = rewards.detach()
    return {
        "rewards/desirable_share": (r * d).mean(),
        "rewards/undesirable_share": (r * (1 - d)).mean(),
        "frac/desirable": d.mean(),
        "frac/undesirable": (1 - d).mean(),
    }


def summarise(record: dict) -> dict:
    """Each class's mean implicit reward (where the rows averaged held the class) and their difference,
    the desirable-vs-undesirable separation."""
    out = dict(record)
    for c in ("desirable", "undesirable"):
        if record[f"frac/{c}"] > 0:
            out[f"rewards/{c}"] = record[f"rewards/{c}_share"] / record[f"frac/{c}"]
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["rewards/margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    return out


@dataclass
class UnpairedObjective:
    """`loss_fn(model, batch)` for `fit`: the prepared policy's `completion_sums`, the reference's, KTO's
    reference point z0 (averaged over processes by `reduce`) or BCO's running δ, then the objective."""

    cfg: KTOConfig
    spec: LossSpec
    reference: Reference
    reduce: object = lambda t: t
    gather: object = lambda t: t
    reward_mean: RunningMean = field(default_factory=RunningMean)

    def __call__(self, model, batch: dict):
        policy = model(batch)
        ref = self.reference(model, batch)
        params = {p: getattr(self.cfg, p) for p in self.spec.params}
        if "kl" in self.spec.inputs:  # z0: detached, averaged over processes, clamped at 0
            params["kl"] = kto_reference_point(policy["mismatched"], ref["mismatched"], self.reduce)
        if "delta" in self.spec.inputs:
            params["delta"] = self.reward_mean.mean
        out = self.spec.fn(policy["completion"], ref["completion"], batch["label"], **params)
        if "delta" in self.spec.inputs and model.training:  # evaluation does not move δ
            self.reward_mean.update(self.gather(out.rewards))
        metrics = {
            "loss": out.losses.detach().mean(),
            **class_shares(out.rewards, batch["label"]),
            "logps/completion": policy["completion"].detach().mean(),
            **out.metrics,
        }
        return out.losses.mean(), metrics


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

    # The micro-batches `fit` will draw on every process (the same seeded order: no `lengths`), for the
    # mismatched pairs.
    order = data_order(cfg, len(train_examples), accelerator)
    train_batches = [
        mb
        for s in range(total_steps(cfg, order))
        for r in range(order.world)
        for mb in order.rank_micro_batches(s, r)
    ]
    kl_reference = {"train": {}, "eval": {}}  # (prompt row, completion row) -> reference log-prob sum

    def sums(m, batch: dict) -> dict:
        return completion_sums(m, batch, cfg.logprob_chunk_size)

    def make_collate(split: str, mismatched: bool):
        def collate(examples: list[dict]) -> dict:
            batch = collate_unpaired(examples, tokenizer.pad_token_id, mismatched)
            if "ref_completion" in examples[0]:
                batch["ref_completion"] = torch.tensor([e["ref_completion"] for e in examples])
                if mismatched:
                    partners = mismatched_partners(len(examples))
                    pairs = [(e["index"], examples[j]["index"]) for e, j in zip(examples, partners)]
                    batch["ref_mismatched"] = torch.tensor([kl_reference[split][p] for p in pairs])
            return batch

        return collate

    def precompute(forward) -> None:
        used = [train_examples[i] for i in used_indices(cfg, len(train_examples), accelerator)]
        splits = {"train": used, "eval": eval_examples}
        plain = make_collate("train", mismatched=False)
        attach_precomputed_reference(cfg, forward, splits, accelerator, collate=plain, fields=FIELDS, log=log)
        if not needs_kl:
            return
        batches = {"train": train_batches, "eval": eval_batches(len(eval_examples), cfg.batch_size)}
        for split, examples in (("train", train_examples), ("eval", eval_examples)):
            pairs = mismatched_examples(examples, batches[split]) if examples else []
            attach_precomputed_reference(
                cfg,
                forward,
                {f"{split}-mismatched": pairs},
                accelerator,
                collate=plain,
                fields=FIELDS,
                log=log,
            )
            kl_reference[split] = {p["pair"]: p["ref_completion"] for p in pairs}

    names = ("completion", "mismatched") if needs_kl else ("completion",)
    reference, setup_metrics = setup_reference(
        cfg, model, accelerator, sums, names=names, precompute=precompute
    )
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    model.train()
    reduce_mean = lambda t: accelerator.reduce(t, "mean")  # noqa: E731
    objective = UnpairedObjective(cfg, spec, reference, reduce_mean, accelerator.gather)

    def evaluate(prepared) -> dict:
        # Every metric is a per-row mean, so batches are weighted by their rows.
        collate, totals = make_collate("eval", needs_kl), {}
        for idx in eval_batches(len(eval_examples), cfg.batch_size):
            examples = [eval_examples[i] for i in idx]
            batch = {k: v.to(accelerator.device) for k, v in collate(examples).items()}
            _, metrics = objective(prepared, batch)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * len(idx) / len(eval_examples)
        return summarise(as_numbers(totals))

    prepared, _ = fit(
        cfg,
        accelerator,
        BatchForward(model, sums),
        train_examples,
        collate=make_collate("train", needs_kl),
        loss_fn=objective,
        evaluate=evaluate if eval_examples else None,
        setup_metrics=setup_metrics,
        state=objective.reward_mean if "delta" in spec.inputs else None,
        summarise=summarise,
    )

    return save_final(accelerator, prepared, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
