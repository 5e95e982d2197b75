"""Supervised fine-tuning: next-token loss on completion tokens only.

    alignkit sft model=PATH data=rows.jsonl output_dir=out

The loss is the mean over all completion tokens of an optimizer step (not a mean of per-micro-batch
means), so it does not depend on how the step is split into micro-batches or devices.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alignkit.config import SFTConfig
from alignkit.data.collate import collate_sft
from alignkit.data.prepare import prepare_sft_data
from alignkit.logprobs import completion_logps
from alignkit.models import add_lora, load_policy, load_tokenizer
from alignkit.runtime import fit, save_final, start_run


def completion_tokens(examples: list[dict]) -> int:
    """Number of completion tokens the loss is taken over."""
    return sum(len(e["completion_ids"]) for e in examples)


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

    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        out = completion_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            chunk_size=cfg.logprob_chunk_size,
        )
        n = out.count.sum().clamp(min=1)
        nll_sum = -out.sum.sum()  # summed here; `loss_scale` divides by the step's token count
        return nll_sum, {"loss": float(nll_sum.detach() / n), "tokens": float(n)}

    def loss_scale(micro_batches: list[list[dict]]) -> list[float]:
        # Token-mean over the whole optimizer step: every micro-batch's summed NLL / the step's tokens
        # on all processes. Distributed backward averages gradients over processes, hence the W.
        n_local = completion_tokens([e for mb in micro_batches for e in mb])
        n = float(accelerator.reduce(torch.tensor(float(n_local), device=accelerator.device), "sum"))
        return [accelerator.num_processes / max(n, 1.0)] * len(micro_batches)

    def evaluate() -> dict:
        nll, n = 0.0, 0
        for start in range(0, len(eval_examples), cfg.batch_size):
            batch = {
                k: v.to(accelerator.device)
                for k, v in collate(eval_examples[start : start + cfg.batch_size]).items()
            }
            loss, metrics = loss_fn(batch)
            nll += float(loss)
            n += int(metrics["tokens"])
        return {"loss": nll / max(n, 1), "perplexity": math.exp(min(nll / max(n, 1), 50))}

    fit(
        cfg,
        accelerator,
        model,
        train_examples,
        collate,
        loss_fn,
        evaluate if eval_examples else None,
        loss_scale,
    )

    return save_final(accelerator, model, tokenizer, output_dir, cfg.lora.merge, log)
