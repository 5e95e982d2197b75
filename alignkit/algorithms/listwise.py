"""Listwise preference optimisation: one prompt, several responses, and scores, probabilities or a ranking.

    alignkit listwise model=PATH data=lists.jsonl loss=soft temperature=0.5
    alignkit listwise model=PATH data=ranked.jsonl loss=plackett_luce

Rows are {prompt, responses: [...], scores | probs | ranking: [...]} (alignkit.data.parse). The implicit
rewards β·(log πθ − log πref) of a list's responses are pushed towards the target distribution (`soft`:
softmax(scores / temperature), or the row's probs) or the ranking (`plackett_luce`: the row's ranking, or
its scores / probs in decreasing order). Every response of every list in a micro-batch goes through the
model in one forward. Reads top to bottom: data -> targets -> policy -> reference log-probs -> loss -> fit
-> save; the reference helpers are dpo.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignkit.config.checks import check_reference_settings
from alignkit.config.load import ConfigError
from alignkit.config.preference import ListwiseConfig
from alignkit.data.collate import collate_lists
from alignkit.data.prepare import prepare_listwise_data
from alignkit.logprobs.completion import completion_logps
from alignkit.losses import LossSpec, check_params, get_listwise_loss
from alignkit.losses.listwise import LISTWISE_LOSSES, soft_targets
from alignkit.models.load import BatchForward, load_policy, load_tokenizer
from alignkit.models.lora import add_lora
from alignkit.models.reference import Reference, attach_precomputed_reference, setup_reference
from alignkit.training.loop import fit
from alignkit.training.order import used_indices
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import evaluate_in_batches

FIELDS = ("prompt_ids", "responses_ids")


def list_logps(model, batch: dict, chunk_size: int = 1024, width: int | None = None) -> dict:
    """{"responses": (B, K) log-prob sums of every list's responses}, 0 in empty slots; K is the batch's
    longest list, or `width` (≥ it) so that passes over batches of different lists line up."""
    out = completion_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size=chunk_size
    )
    B, K = batch["list_mask"].shape
    logps = out.sum.new_zeros(B * K).index_put((batch["slot"],), out.sum).view(B, K)  # (B, K)
    return {"responses": F.pad(logps, (0, (width or K) - K))}


def attach_targets(cfg: ListwiseConfig, examples: list[dict], source: str) -> None:
    """Each example's `target` (soft: a distribution over its responses) or `order` (plackett_luce: its
    response indices best first), from its scores, probs or ranking; a row that cannot give one is an
    error naming its line."""
    for e in examples:
        where = f"{source}:{e['line']}"
        if cfg.loss == "soft":
            if "ranking" in e:
                raise ValueError(
                    f"{where}: field 'ranking': loss 'soft' needs scores or probs (a target distribution); "
                    "use loss=plackett_luce for rows that only rank their responses"
                )
            if "probs" in e:
                e["target"] = e["probs"]
            else:
                scores = torch.tensor([e["scores"]], dtype=torch.float64)
                mask = torch.ones_like(scores, dtype=torch.bool)
                e["target"] = soft_targets(scores, mask, cfg.temperature)[0].tolist()
        elif "ranking" in e:
            e["order"] = e["ranking"]
        else:
            key = "scores" if "scores" in e else "probs"
            values = e[key]
            if len(set(values)) < len(values):
                raise ValueError(
                    f"{where}: field '{key}': {values} has ties, so it gives no strict order for "
                    "plackett_luce; give the row a 'ranking' or use loss=soft"
                )
            e["order"] = sorted(range(len(values)), key=lambda k: -values[k])


@dataclass
class ListwiseObjective:
    """`loss_fn(model, batch)` for `fit`: the (B, K) log-prob sums of every list's responses under the
    prepared policy and the reference, then the listwise objective on them."""

    cfg: ListwiseConfig
    spec: LossSpec
    reference: Reference

    def __call__(self, model, batch: dict):
        mask = batch["list_mask"]  # (B, K)
        K = mask.shape[1]
        policy = model(batch)["responses"][:, :K]
        ref = self.reference(model, batch)["responses"][:, :K]
        inputs = {k: batch[k] for k in self.spec.inputs}  # target (soft) or order (plackett_luce)
        out = self.spec.fn(policy, ref, mask, beta=self.cfg.beta, **inputs)
        metrics = {
            "loss": out.losses.detach().mean(),
            **out.metrics,
            "logps/responses": policy.detach()[mask].mean(),
        }
        return out.losses.mean(), metrics


def train(cfg: ListwiseConfig) -> Path:
    """Train a policy on lists of responses; returns the folder of the saved final model."""
    check_reference_settings(cfg)
    spec = get_listwise_loss(cfg.loss)
    try:
        check_params(cfg.loss, {p: getattr(cfg, p) for p in spec.params}, LISTWISE_LOSSES)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.temperature != ListwiseConfig().temperature and cfg.loss != "soft":
        raise ConfigError(f"temperature={cfg.temperature} is not used by loss '{cfg.loss}' (only by soft)")
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature={cfg.temperature} is not valid (expected a number > 0)")
    accelerator, log, output_dir = start_run(cfg)

    # Data: validated, tokenised and given targets before any model is loaded, so bad rows fail fast.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_listwise_data(cfg, tokenizer, log)
    attach_targets(cfg, train_examples, cfg.data)
    attach_targets(cfg, eval_examples, cfg.eval_data or cfg.data)
    if cfg.temperature != ListwiseConfig().temperature and not any("scores" in e for e in train_examples):
        raise ConfigError(f"temperature={cfg.temperature} is not used: no training row has scores")
    width = max(len(e["responses_ids"]) for e in train_examples + eval_examples)

    model = load_policy(cfg, tokenizer.pad_token_id, accelerator.device)

    def collate(examples: list[dict]) -> dict:
        batch = collate_lists(examples, tokenizer.pad_token_id)
        B, K = batch["list_mask"].shape

        def padded(key: str, fill) -> torch.Tensor:  # (B, K): each row's values, then `fill`s
            return torch.tensor(
                [e[key][: len(e["responses_ids"])] + [fill] * (K - len(e["responses_ids"])) for e in examples]
            )

        if "target" in examples[0]:
            batch["target"] = padded("target", 0.0)
        if "order" in examples[0]:  # empty slots rank last, in slot order
            batch["order"] = torch.tensor(
                [e["order"] + list(range(len(e["order"]), K)) for e in examples], dtype=torch.long
            )
        if "ref_responses" in examples[0]:
            batch["ref_responses"] = padded("ref_responses", 0.0)
        return batch

    def logps(m, batch: dict) -> dict:
        return list_logps(m, batch, cfg.logprob_chunk_size, width)

    def precompute(forward) -> None:
        used = [train_examples[i] for i in used_indices(cfg, len(train_examples), accelerator)]
        splits = {"train": used, "eval": eval_examples}
        attach_precomputed_reference(
            cfg, forward, splits, accelerator, collate=collate, fields=FIELDS, log=log
        )

    reference, setup_metrics = setup_reference(
        cfg, model, accelerator, logps, names=("responses",), precompute=precompute
    )
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    model.train()
    objective = ListwiseObjective(cfg, spec, reference)

    def evaluate(prepared) -> dict:
        return evaluate_in_batches(
            prepared, eval_examples, cfg.batch_size, collate, loss_fn=objective, device=accelerator.device
        )

    prepared, _ = fit(
        cfg,
        accelerator,
        BatchForward(model, logps),
        train_examples,
        collate=collate,
        loss_fn=objective,
        evaluate=evaluate if eval_examples else None,
        setup_metrics=setup_metrics,
    )

    return save_final(accelerator, model, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
