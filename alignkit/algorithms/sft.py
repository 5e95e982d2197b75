"""Supervised fine-tuning: next-token loss on completion tokens only.

    alignkit sft model=PATH data=rows.jsonl output_dir=out

The loss is the mean over all completion tokens of an optimizer step (not a mean of per-micro-batch
means), so it does not depend on how the step is split into micro-batches or devices."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alignkit.config.supervised import SFTConfig
from alignkit.data.collate import collate_sft, completion_tokens
from alignkit.data.prepare import prepare_sft_data
from alignkit.logprobs.completion import completion_logps
from alignkit.models.load import BatchForward, load_policy, load_tokenizer
from alignkit.models.lora import add_lora
from alignkit.training.loop import fit
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import as_numbers


def summed_nll(model, batch: dict, chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """{"nll": summed negative log-likelihood of the batch's completion tokens, "tokens": their number};
    the batch function the prepared policy runs."""
    out = completion_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size=chunk_size
    )
    return {"nll": -out.sum.sum(), "tokens": out.count.sum()}


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The token-mean NLL of a micro-batch (`fit` weights it by its tokens: `units=completion_tokens`),
    so the step's loss is the mean over all its completion tokens on all processes."""
    out = model(batch)
    loss = out["nll"] / out["tokens"].clamp(min=1)
    return loss, {"loss": loss.detach()}


def train(cfg: SFTConfig) -> Path:
    """Fine-tune a causal LM on prompt/completion rows; returns the folder of the saved final model."""
    accelerator, log, output_dir = start_run(cfg)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_sft_data(cfg, tokenizer, log)

    model = load_policy(cfg, tokenizer.pad_token_id, accelerator.device)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    model.train()

    def collate(examples: list[dict]) -> dict:
        return collate_sft(examples, tokenizer.pad_token_id)

    def nll(m, batch: dict) -> dict:
        return summed_nll(m, batch, cfg.logprob_chunk_size)

    def evaluate(prepared) -> dict:
        totals = {"nll": 0.0, "tokens": 0.0}
        for start in range(0, len(eval_examples), cfg.batch_size):
            chunk = eval_examples[start : start + cfg.batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate(chunk).items()}
            for k, v in prepared(batch).items():
                totals[k] = totals[k] + v.float()
        totals = as_numbers(totals)
        loss = totals["nll"] / max(totals["tokens"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50))}

    prepared, _ = fit(
        cfg,
        accelerator,
        BatchForward(model, nll),
        train_examples,
        collate=collate,
        loss_fn=sft_loss,
        evaluate=evaluate if eval_examples else None,
        units=completion_tokens,
    )

    return save_final(accelerator, prepared, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
