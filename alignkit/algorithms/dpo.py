"""Offline preference optimisation: DPO and the objectives registered in alignkit.losses.

    alignkit dpo model=PATH data=pairs.jsonl output_dir=out max_steps=20

Reads top to bottom: data -> policy -> reference log-probs -> loss -> fit -> save.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.config import DPOConfig, save_config
from alignkit.data.collate import collate_pairs
from alignkit.data.prepare import cache_dir, prepare_preference_data
from alignkit.data.tokenize import fingerprint, source_fingerprint
from alignkit.logprobs import completion_logps
from alignkit.losses import get_loss, preference_loss
from alignkit.models import add_lora, freeze, load_causal_lm, load_tokenizer, save_model
from alignkit.runtime import fit, make_accelerator

REFERENCE_MODES = ("copy", "adapter", "precomputed")


def pair_logps(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """One forward over the 2B concatenated rows -> (chosen sums, rejected sums, chosen counts,
    rejected counts), each (B,)."""
    out = completion_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size=chunk_size
    )
    B = batch["input_ids"].shape[0] // 2
    return out.sum[:B], out.sum[B:], out.count[:B], out.count[B:]


@torch.no_grad()
def reference_logps(
    model, examples: list[dict], pad_id: int, batch_size: int, chunk_size: int, device
) -> dict:
    """Reference log-prob sums of every example's chosen and rejected completion, in one pass."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        c, r, _, _ = pair_logps(model, batch, chunk_size)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}


def _model_fingerprint(name_or_path: str) -> str:
    """Identity of model weights: file sizes and times for a local folder, else the hub name."""
    path = Path(name_or_path)
    if path.is_dir():
        return fingerprint(
            [source_fingerprint(str(p)) for p in sorted(path.glob("*.safetensors"))], str(path)
        )
    return fingerprint(name_or_path)


def attach_precomputed_reference(
    cfg: DPOConfig, model, tokenizer, splits: dict, accelerator, log=print
) -> None:
    """Compute the reference log-probs of every split once (or load them from the cache) and store
    them on the examples as ref_chosen / ref_rejected, so no reference model is held during training."""
    for name, examples in splits.items():
        if not examples:
            continue
        key = fingerprint(
            _model_fingerprint(cfg.reference_model or cfg.model),
            cfg.dtype,
            [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples],
        )
        path = cache_dir(cfg) / f"reference-{name}-{key}.safetensors"
        if path.exists():
            ref = load_file(str(path))
            log(f"reference log-probs for {name} loaded from {path}")
        else:
            ref = reference_logps(
                model,
                examples,
                tokenizer.pad_token_id,
                cfg.batch_size * 2,
                cfg.logprob_chunk_size,
                accelerator.device,
            )
            if accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(ref, str(tmp))
                tmp.replace(path)
            log(f"reference log-probs for {len(examples)} {name} pairs computed and cached in {path}")
        for e, c, r in zip(examples, ref["chosen"].tolist(), ref["rejected"].tolist()):
            e["ref_chosen"], e["ref_rejected"] = c, r


def train(cfg: DPOConfig) -> Path:
    """Train a policy on preference pairs; returns the folder of the saved final model."""
    if cfg.reference not in REFERENCE_MODES:
        raise ValueError(f"reference '{cfg.reference}' is not one of {', '.join(REFERENCE_MODES)}")
    if cfg.reference == "adapter" and not cfg.lora.enabled:
        raise ValueError("reference=adapter needs lora.enabled=true (the reference is the base without it)")
    spec = get_loss(cfg.loss)
    accelerator = make_accelerator(cfg)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        save_config(cfg, output_dir)

    # Data: validated and tokenised before any model is loaded, so bad rows fail fast.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_preference_data(cfg, tokenizer, log)

    model = load_causal_lm(
        cfg.model,
        cfg.dtype,
        cfg.attn_implementation,
        cfg.trust_remote_code,
        cfg.gradient_checkpointing,
        tokenizer.pad_token_id,
    )
    model.to(accelerator.device)

    # The reference: log-probs of the frozen starting point (or of `reference_model`).
    reference = None
    if spec.needs_reference and cfg.reference == "precomputed":
        if cfg.reference_model:
            ref_model = freeze(
                load_causal_lm(cfg.reference_model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
            ).to(accelerator.device)
        else:
            ref_model = model  # before training, the policy is the reference: no second copy
        attach_precomputed_reference(
            cfg, ref_model, tokenizer, {"train": train_examples, "eval": eval_examples}, accelerator, log
        )
        del ref_model
    elif spec.needs_reference and cfg.reference == "copy":
        reference = freeze(
            load_causal_lm(
                cfg.reference_model or cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code
            )
        ).to(accelerator.device)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    model.train()

    def collate(examples: list[dict]) -> dict:
        batch = collate_pairs(examples, tokenizer.pad_token_id)
        if "ref_chosen" in examples[0]:
            batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples])
            batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples])
        return batch

    def reference_for(batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not spec.needs_reference:
            return None, None
        if "ref_chosen" in batch:
            return batch["ref_chosen"], batch["ref_rejected"]
        with torch.no_grad():
            if cfg.reference == "adapter":
                with accelerator.unwrap_model(model).disable_adapter():
                    c, r, _, _ = pair_logps(model, batch, cfg.logprob_chunk_size)
            else:
                c, r, _, _ = pair_logps(reference, batch, cfg.logprob_chunk_size)
        return c, r

    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected, n_chosen, n_rejected = pair_logps(model, batch, cfg.logprob_chunk_size)
        ref_chosen, ref_rejected = reference_for(batch)
        out = preference_loss(
            cfg.loss,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            n_chosen,
            n_rejected,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            preference=batch["preference"],
        )
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "loss": float(out.losses.detach().mean()),
            "rewards/chosen": float(out.chosen_rewards.mean()),
            "rewards/rejected": float(out.rejected_rewards.mean()),
            "rewards/accuracies": float((margins > 0).float().mean()),
            "rewards/margins": float(margins.mean()),
            "logps/chosen": float(chosen.detach().mean()),
            "logps/rejected": float(rejected.detach().mean()),
            **out.metrics,
        }
        return out.losses.mean(), metrics

    def evaluate() -> dict:
        totals: dict[str, float] = {}
        for start in range(0, len(eval_examples), cfg.batch_size):
            examples = eval_examples[start : start + cfg.batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate(examples).items()}
            _, metrics = loss_fn(batch)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * len(examples)
        return {k: v / len(eval_examples) for k, v in totals.items()}

    fit(cfg, accelerator, model, train_examples, collate, loss_fn, evaluate if eval_examples else None)

    final = output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, final, merge_lora=cfg.lora.merge)
        log(f"final model saved to {final}")
    return final
