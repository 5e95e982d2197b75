"""Offline preference optimisation: DPO and the objectives registered in alignkit.losses.

    alignkit dpo model=PATH data=pairs.jsonl output_dir=out max_steps=20

Reads top to bottom: data -> policy -> reference log-probs -> loss (+ constraints) -> fit -> save.
The reference helpers here (`setup_reference`, `attach_precomputed_reference`, `reference_forward`) are
shared with the unpaired (kto.py) and listwise (listwise.py) trainers; `stages > 1` hands the run to
sdpo.py, which calls `train` once per stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.config import ConfigError, ConstraintSettings, DPOConfig
from alignkit.data.collate import additive_mask, collate_pairs, collate_pairs_shared_prompt
from alignkit.data.prepare import cache_dir, prepare_preference_data
from alignkit.data.tokenize import fingerprint, source_fingerprint
from alignkit.logprobs import completion_logps
from alignkit.losses import LOSSES, LossSpec, RunningMean, check_params, get_loss, preference_loss
from alignkit.losses.constraints import check_constraints, constraint_losses, implicit_rewards
from alignkit.models import add_lora, freeze, load_causal_lm, load_policy, load_tokenizer
from alignkit.runtime import evaluate_in_batches, fit, save_final, start_run, used_indices

REFERENCE_MODES = ("copy", "adapter", "precomputed")
PAIR_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_logps(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """One forward for the whole batch -> (chosen sums, rejected sums, chosen counts, rejected counts),
    each (B,).

    Two layouts (alignkit.data.collate): rows of packed [prompt | chosen | rejected] segments with a 4D
    mask (`share_prompt`, each prompt computed once), or 2B rows, chosen then rejected.
    """
    if "allowed" in batch:
        dtype = next(model.parameters()).dtype
        mask = additive_mask(batch["allowed"], dtype)  # (R, 1, T, T)
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
        if "flagged" in examples[0]:  # (B, F, 2): per flagged_reward constraint, chosen / rejected flagged
            batch["flagged"] = torch.tensor([e["flagged"] for e in examples], dtype=torch.bool)
        return batch

    return collate


@torch.no_grad()
def reference_logps(model, examples: list[dict], collate, logps: Callable, batch_size: int, device) -> dict:
    """`logps(model, batch)` -> {name: (B,) or (B, K) tensor} over every example, in one pass, concatenated
    per name (on the CPU, float32)."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        for name, value in logps(model, batch).items():
            out.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(values) for name, values in out.items()}


def _model_fingerprint(name_or_path: str) -> str:
    """Identity of model weights: file sizes and times for a local folder, else the hub name."""
    path = Path(name_or_path)
    if path.is_dir():
        return fingerprint(
            [source_fingerprint(str(p)) for p in sorted(path.glob("*.safetensors"))], str(path)
        )
    return fingerprint(name_or_path)


def attach_precomputed_reference(
    cfg,
    model,
    splits: dict,
    accelerator,
    collate,
    logps: Callable,
    fields: tuple[str, ...] = PAIR_FIELDS,
    log=print,
) -> None:
    """Compute the reference log-probs of every split once (or load them from the cache) and store them on
    the examples, so no reference model is held during training.

    `logps(model, batch)` returns {name: (B,) or (B, K)}; each example gets e[f"ref_{name}"] (a float, or a
    list for (B, K)). The cache key is the reference weights, the dtype and each example's `fields`.
    """
    for name, examples in splits.items():
        if not examples:
            continue
        key = fingerprint(
            _model_fingerprint(cfg.reference_model or cfg.model),
            cfg.dtype,
            fields,
            [[e[f] for f in fields] for e in examples],
        )
        path = cache_dir(cfg) / f"reference-{name}-{key}.safetensors"
        if path.exists():
            ref = load_file(str(path))
            log(f"reference log-probs for {name} loaded from {path}")
        else:
            ref = reference_logps(model, examples, collate, logps, cfg.batch_size * 2, accelerator.device)
            if accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(ref, str(tmp))
                tmp.replace(path)
            log(f"reference log-probs for {len(examples)} {name} examples computed and cached in {path}")
        for column, values in ref.items():
            for e, v in zip(examples, values.tolist()):
                e[f"ref_{column}"] = v


def check_reference_settings(cfg) -> None:
    """The `reference` mode is known, and `adapter` has an adapter to switch off."""
    if cfg.reference not in REFERENCE_MODES:
        raise ValueError(f"reference '{cfg.reference}' is not one of {', '.join(REFERENCE_MODES)}")
    if cfg.reference == "adapter" and not cfg.lora.enabled:
        raise ValueError("reference=adapter needs lora.enabled=true (the reference is the base without it)")


def _frozen(cfg, name_or_path: str, accelerator):
    model = load_causal_lm(name_or_path, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
    return freeze(model).to(accelerator.device)


def setup_reference(cfg, model, accelerator, precompute: Callable) -> tuple[torch.nn.Module | None, dict]:
    """Set up the reference for `cfg.reference`, before training (and before LoRA is added).

    precomputed: calls `precompute(reference_model)` once, with `cfg.reference_model` when it names other
    weights than `cfg.model`, else the policy itself (before training it is the reference: no second copy),
    and returns (None, {"reference_time": seconds}). copy: (a frozen copy, {}). adapter: (None, {}), the
    LoRA base with the adapter switched off being the reference (`reference_forward`).
    """
    if cfg.reference == "precomputed":
        separate = cfg.reference_model and cfg.reference_model != cfg.model
        ref_model = _frozen(cfg, cfg.reference_model, accelerator) if separate else model
        t0 = time.perf_counter()
        precompute(ref_model)
        return None, {"reference_time": time.perf_counter() - t0}
    if cfg.reference == "copy":
        return _frozen(cfg, cfg.reference_model or cfg.model, accelerator), {}
    return None, {}


def reference_forward(cfg, model, reference, accelerator, logps: Callable, batch: dict):
    """`logps(reference, batch)` computed now, without gradient (copy and adapter modes)."""
    with torch.no_grad():
        if cfg.reference == "adapter":
            with accelerator.unwrap_model(model).disable_adapter():
                return logps(model, batch)
        return logps(reference, batch)


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
        check_constraints(cfg.constraints, ConstraintSettings())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.stages < 1 or not 0 <= cfg.stage <= cfg.stages:
        raise ConfigError(
            f"stages={cfg.stages}, stage={cfg.stage}: need stages >= 1 and 0 <= stage <= stages"
        )


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
    # Flag columns feed flagged_reward constraints that have no scorer, and nothing else.
    by_column = any(c.type == "flagged_reward" and c.scorer is None for c in cfg.constraints)
    for source, examples in ((cfg.data, train), (cfg.eval_data or cfg.data, held_out)):
        rows = [e["line"] for e in examples if "chosen_flagged" in e or "rejected_flagged" in e]
        if rows and not by_column:
            raise ValueError(
                f"{source}:{rows[0]}: field 'chosen_flagged'/'rejected_flagged': no constraint reads the flag "
                f"columns ({len(rows)} rows have one); add constraints=[{{type: flagged_reward}}] or drop them"
            )
    if by_column and not any("chosen_flagged" in e or "rejected_flagged" in e for e in train):
        raise ValueError(
            f"{cfg.data}: a flagged_reward constraint without a scorer reads the rows' chosen_flagged / "
            "rejected_flagged columns, and no training row has one; add the columns or give it a scorer"
        )


def attach_flags(cfg: DPOConfig, tokenizer, splits: list[list[dict]], log=print) -> None:
    """Flag each example's chosen and rejected response for every flagged_reward constraint, once, before
    training: from the constraint's scorer (any alignkit.rewards source, run over the decoded prompt and
    responses; flagged when the score is below / above `cutoff`) or from the rows' flag columns (absent =
    not flagged). Stored as e["flagged"] = [[chosen, rejected] per flagged_reward constraint]."""
    for i, c in enumerate(cfg.constraints):
        if c.type != "flagged_reward":
            continue
        source = None
        if c.scorer is not None:
            from alignkit.rewards import build_reward

            source = build_reward(c.scorer, where=f"constraints[{i}].scorer")
        n_flagged = n_total = 0
        for examples in splits:
            if source is None:
                flags = [[e.get("chosen_flagged", False), e.get("rejected_flagged", False)] for e in examples]
            else:
                flags = _scorer_flags(source, c, tokenizer, examples)
            for e, f in zip(examples, flags):
                e.setdefault("flagged", []).append(f)
                n_flagged += sum(f)
                n_total += 2
        how = "the rows' flag columns" if source is None else f"{source.name} {c.flag_when} {c.cutoff}"
        log(f"constraints[{i}] flagged_reward: {n_flagged} of {n_total} responses flagged ({how})")


def _scorer_flags(source, c: ConstraintSettings, tokenizer, examples: list[dict]) -> list[list[bool]]:
    if not examples:
        return []

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    prompts = [text(e["prompt_ids"]) for e in examples]
    responses = [text(e["chosen_ids"]) for e in examples] + [text(e["rejected_ids"]) for e in examples]
    scores = torch.cat(
        [
            source.score((prompts * 2)[k : k + 256], responses[k : k + 256])
            for k in range(0, len(responses), 256)
        ]
    )
    flagged = (scores < c.cutoff) if c.flag_when == "below" else (scores > c.cutoff)
    n = len(examples)
    return [[bool(flagged[b]), bool(flagged[n + b])] for b in range(n)]


def stage_examples(examples: list[dict], stage: int, stages: int) -> list[dict]:
    """The `stage`-th (1-based) of `stages` contiguous, near-equal parts of `examples`, in file order."""
    n = len(examples)
    return examples[round((stage - 1) * n / stages) : round(stage * n / stages)]


def train(cfg: DPOConfig) -> Path:
    """Train a policy on preference pairs; returns the folder of the saved final model."""
    if cfg.stages > 1 and cfg.stage == 0:
        from alignkit.algorithms import sdpo

        return sdpo.train(cfg)  # one `train` per stage, each against the previous stage's model
    check_reference_settings(cfg)
    if cfg.share_prompt and "flash" in (cfg.attn_implementation or ""):
        raise ValueError(
            "share_prompt needs a 4D attention mask, which flash attention does not take; "
            "set share_prompt=false or attn_implementation=sdpa"
        )
    spec = get_loss(cfg.loss)
    check_loss_settings(cfg, spec)
    accelerator, log, output_dir = start_run(cfg)

    # Data: validated and tokenised before any model is loaded, so bad rows fail fast.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_preference_data(cfg, tokenizer, log)
    if cfg.stage > 0:
        train_examples = stage_examples(train_examples, cfg.stage, cfg.stages)
        log(f"stage {cfg.stage} of {cfg.stages}: {len(train_examples)} training pairs")
    check_row_columns(cfg, spec, train_examples, eval_examples)
    attach_flags(cfg, tokenizer, [train_examples, eval_examples], log)

    model = load_policy(cfg, tokenizer.pad_token_id, accelerator.device)
    collate = make_collate(tokenizer.pad_token_id, cfg.share_prompt)

    def sums(m, batch: dict) -> dict:
        chosen, rejected, _, _ = pair_logps(m, batch, cfg.logprob_chunk_size)
        return {"chosen": chosen, "rejected": rejected}

    def precompute(ref_model) -> None:
        # Only rows the run will train on (all of them unless max_steps ends it within the first epoch).
        used = [train_examples[i] for i in used_indices(cfg, len(train_examples), accelerator)]
        splits = {"train": used, "eval": eval_examples}
        attach_precomputed_reference(cfg, ref_model, splits, accelerator, collate, sums, PAIR_FIELDS, log)

    # The reference: log-probs of the frozen starting point (or of `reference_model`).
    reference, setup_metrics = None, {}
    if spec.needs_reference:
        reference, setup_metrics = setup_reference(cfg, model, accelerator, precompute)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    model.train()

    def reference_for(batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not spec.needs_reference:
            return None, None
        if "ref_chosen" in batch:
            return batch["ref_chosen"], batch["ref_rejected"]
        ref = reference_forward(cfg, model, reference, accelerator, sums, batch)
        return ref["chosen"], ref["rejected"]

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
        losses, constraint_metrics = out.losses, {}
        if cfg.constraints:
            # The constraint judges the same implicit reward as the objective, with its gradient.
            def reward(logps, ref, n):
                norm = spec.length_normalised
                return implicit_rewards(logps, ref, n, beta=cfg.beta, length_normalised=norm)

            extra, constraint_metrics = constraint_losses(
                cfg.constraints,
                chosen_rewards=reward(chosen, ref_chosen, n_chosen),
                rejected_rewards=reward(rejected, ref_rejected, n_rejected),
                chosen_logps=chosen,
                chosen_lengths=n_chosen,
                flagged=batch.get("flagged"),
            )
            losses = losses + extra
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "loss": float(losses.detach().mean()),
            "rewards/chosen": float(out.chosen_rewards.mean()),
            "rewards/rejected": float(out.rejected_rewards.mean()),
            "rewards/accuracies": float((margins > 0).float().mean()),
            "rewards/margins": float(margins.mean()),
            "logps/chosen": float(chosen.detach().mean()),
            "logps/rejected": float(rejected.detach().mean()),
            **out.metrics,
            **constraint_metrics,
        }
        return losses.mean(), metrics

    def evaluate() -> dict:
        return evaluate_in_batches(eval_examples, cfg.batch_size, collate, loss_fn, accelerator.device)

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

    return save_final(accelerator, model, tokenizer, output_dir, cfg.lora.merge, log)
