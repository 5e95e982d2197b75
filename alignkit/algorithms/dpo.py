"""Offline preference optimisation: DPO and the objectives registered in alignkit.losses.

    alignkit dpo model=PATH data=pairs.jsonl output_dir=out max_steps=20

Reads top to bottom: data -> policy -> reference log-probs -> loss -> fit -> save.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.config import ConfigError, DPOConfig, save_config
from alignkit.data.collate import collate_pairs, collate_pairs_shared_prompt
from alignkit.data.prepare import cache_dir, prepare_preference_data
from alignkit.data.tokenize import fingerprint, source_fingerprint
from alignkit.logprobs import completion_logps
from alignkit.losses import LOSSES, LossSpec, RunningMean, check_params, get_loss, preference_loss
from alignkit.models import add_lora, freeze, load_causal_lm, load_tokenizer, save_model
from alignkit.runtime import fit, make_accelerator, used_indices

REFERENCE_MODES = ("copy", "adapter", "precomputed")


def pair_logps(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """One forward for the whole batch -> (chosen sums, rejected sums, chosen counts, rejected counts),
    each (B,).

    Two layouts (alignkit.data.collate): rows of packed [prompt | chosen | rejected] segments with a 4D
    mask (`share_prompt`, each prompt computed once), or 2B rows, chosen then rejected.
    """
    if "allowed" in batch:
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(batch["allowed"].shape, dtype=dtype, device=batch["allowed"].device)
        mask = mask.masked_fill(~batch["allowed"], torch.finfo(dtype).min)[:, None]  # (B, 1, T, T)
        chosen_mask, rejected_mask = batch["chosen_mask"], batch["rejected_mask"]
        out = completion_logps(
            model,
            batch["input_ids"],
            mask,
            chosen_mask + rejected_mask,
            batch["position_ids"],
            chunk_size,
            batch["source_index"],
        )
        B = batch["preference"].shape[0]
        segment = batch["segment"]  # (R, T) pair index of each completion token

        def per_pair(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            picked = mask.bool()
            return values.new_zeros(B).index_add(0, segment[picked], values[picked])

        return (
            per_pair(chosen_mask, out.token_logps),
            per_pair(rejected_mask, out.token_logps),
            per_pair(chosen_mask, chosen_mask).long(),
            per_pair(rejected_mask, rejected_mask).long(),
        )
    out = completion_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size=chunk_size
    )
    B = batch["input_ids"].shape[0] // 2
    return out.sum[:B], out.sum[B:], out.count[:B], out.count[B:]


def make_collate(pad_id: int, share_prompt: bool):
    """The batch layout for pairs, with precomputed reference log-probs when the examples carry them."""

    def collate(examples: list[dict]) -> dict:
        layout = collate_pairs_shared_prompt if share_prompt else collate_pairs
        batch = layout(examples, pad_id)
        if "ref_chosen" in examples[0]:
            batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples])
            batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples])
        return batch

    return collate


@torch.no_grad()
def reference_logps(model, examples: list[dict], collate, batch_size: int, chunk_size: int, device) -> dict:
    """Reference log-prob sums of every example's chosen and rejected completion, in one pass."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
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
                make_collate(tokenizer.pad_token_id, cfg.share_prompt),
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


def check_loss_settings(cfg: DPOConfig, spec: LossSpec) -> None:
    """Settings are never silently ignored: a loss parameter (or reference setting) that the chosen
    objective does not use, set to a non-default value, is an error; the ones it uses are range-checked."""
    defaults = DPOConfig()
    unused = sorted({p for s in LOSSES.values() for p in s.params} - set(spec.params))
    if not spec.needs_reference:
        unused += ["reference", "reference_model"]
    for name in unused:
        if getattr(cfg, name) != getattr(defaults, name):
            uses = f"it uses {', '.join(spec.params)}" + ("" if spec.needs_reference else " and no reference")
            raise ConfigError(
                f"{name}={getattr(cfg, name)!r} is not used by loss '{cfg.loss}' ({uses}); remove the "
                "setting or choose a loss that uses it (docs/objectives.md)"
            )
    try:
        check_params(cfg.loss, {p: getattr(cfg, p) for p in spec.params})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_row_columns(cfg: DPOConfig, spec: LossSpec, train: list[dict], held_out: list[dict]) -> None:
    """Per-row columns the objective cannot use (soft `preference` labels, `margin`) are errors too."""
    for source, examples in ((cfg.data, train), (cfg.eval_data or cfg.data, held_out)):
        for column, unused in (
            ("preference", lambda e: e["preference"] != 1.0),
            ("margin", lambda e: "margin" in e),
        ):
            rows = [e["line"] for e in examples if column not in spec.inputs and unused(e)]
            if rows:
                takes = [n for n, s in LOSSES.items() if column in s.inputs]
                raise ValueError(
                    f"{source}:{rows[0]}: field '{column}': loss '{cfg.loss}' does not use per-row "
                    f"'{column}' values ({len(rows)} rows have one); use loss={'/'.join(takes)} or drop the "
                    "column"
                )


def train(cfg: DPOConfig) -> Path:
    """Train a policy on preference pairs; returns the folder of the saved final model."""
    if cfg.reference not in REFERENCE_MODES:
        raise ValueError(f"reference '{cfg.reference}' is not one of {', '.join(REFERENCE_MODES)}")
    if cfg.share_prompt and "flash" in (cfg.attn_implementation or ""):
        raise ValueError(
            "share_prompt needs a 4D attention mask, which flash attention does not take; "
            "set share_prompt=false or attn_implementation=sdpa"
        )
    if cfg.reference == "adapter" and not cfg.lora.enabled:
        raise ValueError("reference=adapter needs lora.enabled=true (the reference is the base without it)")
    spec = get_loss(cfg.loss)
    check_loss_settings(cfg, spec)
    accelerator = make_accelerator(cfg)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        save_config(cfg, output_dir)

    # Data: validated and tokenised before any model is loaded, so bad rows fail fast.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_preference_data(cfg, tokenizer, log)
    check_row_columns(cfg, spec, train_examples, eval_examples)

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
    setup_metrics: dict[str, float] = {}
    if spec.needs_reference and cfg.reference == "precomputed":
        if cfg.reference_model:
            ref_model = freeze(
                load_causal_lm(cfg.reference_model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
            ).to(accelerator.device)
        else:
            ref_model = model  # before training, the policy is the reference: no second copy
        t0 = time.perf_counter()
        # Only rows the run will train on (all of them unless max_steps ends it within the first epoch).
        used = [train_examples[i] for i in used_indices(cfg, len(train_examples), accelerator)]
        attach_precomputed_reference(
            cfg, ref_model, tokenizer, {"train": used, "eval": eval_examples}, accelerator, log
        )
        setup_metrics["reference_time"] = time.perf_counter() - t0
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

    collate = make_collate(tokenizer.pad_token_id, cfg.share_prompt)

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

    reward_mean = RunningMean()  # bco_pair's δ: mean implicit reward of all previous training batches

    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected, n_chosen, n_rejected = pair_logps(model, batch, cfg.logprob_chunk_size)
        ref_chosen, ref_rejected = reference_for(batch)
        # Exactly the settings and columns the objective uses (check_loss_settings rejected the others).
        params = {p: getattr(cfg, p) for p in spec.params}
        params.update({k: batch[k] for k in ("preference", "margin") if k in spec.inputs and k in batch})
        if "delta" in spec.inputs:
            params["delta"] = reward_mean.mean
        out = preference_loss(
            cfg.loss, chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, **params
        )
        if "delta" in spec.inputs and model.training:  # evaluation does not move δ
            reward_mean.update(accelerator.gather(torch.cat([out.chosen_rewards, out.rejected_rewards])))
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

    fit(
        cfg,
        accelerator,
        model,
        train_examples,
        collate,
        loss_fn,
        evaluate if eval_examples else None,
        setup_metrics=setup_metrics,
        state=reward_mean if "delta" in spec.inputs else None,
    )

    final = output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, final, merge_lora=cfg.lora.merge)
        log(f"final model saved to {final}")
    return final
