"""Offline preference optimisation: DPO and the objectives registered in alignkit.losses.

    alignkit dpo model=PATH data=pairs.jsonl output_dir=out max_steps=20

Reads top to bottom: data -> policy -> reference log-probs -> loss (+ constraints) -> fit -> save.
`pair_logps` is the batch function the prepared policy runs (one forward for chosen and rejected);
`paired_loss` is the objective on its outputs, a pure function of tensors; `PairedObjective` binds the
two, the reference and bco_pair's running δ into the `loss_fn` that `fit` calls. Stepwise DPO
(`stages > 1`) is sdpo.py, which calls `train` once per stage (the CLI routes it there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config.checks import check_reference_settings
from alignkit.config.load import ConfigError
from alignkit.config.preference import ConstraintSettings, DPOConfig
from alignkit.data.collate import additive_mask, collate_pairs, collate_pairs_shared_prompt
from alignkit.data.prepare import prepare_preference_data
from alignkit.logprobs.completion import completion_logps
from alignkit.losses import LOSSES, LossSpec, RunningMean, check_params, get_loss, preference_loss
from alignkit.losses.constraints import check_constraints, constraint_losses, implicit_rewards
from alignkit.losses.mdpo import mdpo_terms
from alignkit.models.load import BatchForward, load_policy, load_tokenizer, shared_prompt_fits
from alignkit.models.lora import add_lora
from alignkit.models.reference import Reference, attach_precomputed_reference, setup_reference
from alignkit.models.vision import check_vision_settings, freeze_vision, image_inputs, vision_setup
from alignkit.training.loop import fit
from alignkit.training.order import used_indices
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import evaluate_in_batches

PAIR_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_logps(model, batch: dict, chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """One forward for the whole batch -> {"chosen", "rejected": log-prob sums, "n_chosen", "n_rejected":
    completion token counts}, each (B,). The batch function the prepared policy runs (`BatchForward`).

    Two layouts (alignkit.data.collate): rows of packed [prompt | chosen | rejected] segments with a 4D
    mask (`share_prompt`, each prompt computed once), or 2B rows, chosen then rejected. With images
    (alignkit.data.vision_rows) each pair's images are encoded once in either layout, and mDPO batches (two-row)
    add B rows of the chosen response under corrupted images ("corrupt_chosen", "n_corrupt_chosen").
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
            position_ids=batch["position_ids"],
            chunk_size=chunk_size,
            source_index=batch["source_index"],
            model_inputs=lambda backbone: image_inputs(backbone, batch),
        )
        B = batch["preference"].shape[0]
        segment = batch["segment"]  # (R, T) pair index of each completion token

        def per_pair(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            picked = mask.bool()
            return values.new_zeros(B).index_add(0, segment[picked], values[picked])

        return {
            "chosen": per_pair(chosen_mask, out.token_logps),
            "rejected": per_pair(rejected_mask, out.token_logps),
            "n_chosen": per_pair(chosen_mask, chosen_mask).long(),
            "n_rejected": per_pair(rejected_mask, rejected_mask).long(),
        }
    out = completion_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        chunk_size=chunk_size,
        model_inputs=lambda backbone: image_inputs(backbone, batch),
    )
    B = batch["preference"].shape[0]
    logps = {
        "chosen": out.sum[:B],
        "rejected": out.sum[B : 2 * B],
        "n_chosen": out.count[:B],
        "n_rejected": out.count[B : 2 * B],
    }
    if out.sum.shape[0] == 3 * B:  # mDPO: the chosen response again, under the corrupted images
        logps.update({"corrupt_chosen": out.sum[2 * B :], "n_corrupt_chosen": out.count[2 * B :]})
    return logps


def make_collate(pad_id: int, share_prompt: bool, layout=None):
    """The batch layout for pairs (`layout(examples, pad_id)`, default by `share_prompt`), with precomputed
    reference log-probs when the examples carry them."""

    def collate(examples: list[dict]) -> dict:
        pairs = layout or (collate_pairs_shared_prompt if share_prompt else collate_pairs)
        batch = pairs(examples, pad_id)
        for key in [k for k in examples[0] if k.startswith("ref_")]:
            batch[key] = torch.tensor([e[key] for e in examples])
        if "flagged" in examples[0]:  # (B, F, 2): per flagged_reward constraint, chosen / rejected flagged
            batch["flagged"] = torch.tensor([e["flagged"] for e in examples], dtype=torch.bool)
        return batch

    return collate


def check_loss_settings(cfg: DPOConfig, spec: LossSpec, defaults=None) -> None:
    """Settings are never silently ignored: a loss parameter (or reference setting) that the chosen
    objective does not use, set away from its default (in `defaults`, a config of cfg's kind; DPOConfig()
    by default), is an error; the ones it uses are range-checked."""
    defaults = defaults or DPOConfig()
    unused = sorted({p for s in LOSSES.values() for p in s.params} - set(spec.params))
    if not spec.needs_reference:
        unused += ["reference"]
    for name in unused:
        if getattr(cfg, name) != getattr(defaults, name):
            uses = f"it uses {', '.join(spec.params)}" + ("" if spec.needs_reference else " and no reference")
            raise ConfigError(
                f"{name}={getattr(cfg, name)!r} is not used by loss '{cfg.loss}' ({uses}); remove the "
                "setting or choose a loss that uses it (docs/objectives.md)"
            )
    try:
        check_params(cfg.loss, {p: getattr(cfg, p) for p in spec.params})
        check_constraints(getattr(cfg, "constraints", []), ConstraintSettings())
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


def paired_loss(
    cfg: DPOConfig,
    spec: LossSpec,
    policy: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    *,
    batch: dict,
    delta: float | None = None,
):
    """The objective `cfg.loss` plus its constraints on one batch -> (loss, metrics, LossOutput).

    policy: `pair_logps` of the policy ({"chosen", "rejected", "n_chosen", "n_rejected"}, each (B,));
    ref: the reference's {"chosen", "rejected"} ({} for reference-free objectives); batch: its per-row
    columns (preference, margin, flagged); delta: bco_pair's running mean reward. loss is the mean over
    the B pairs; metrics are detached 0-dim tensors, each a mean over the pairs.
    """
    chosen, rejected = policy["chosen"], policy["rejected"]
    n_chosen, n_rejected = policy["n_chosen"], policy["n_rejected"]
    ref_chosen, ref_rejected = ref.get("chosen"), ref.get("rejected")
    # Exactly the settings and columns the objective uses (check_loss_settings rejected the others).
    params = {p: getattr(cfg, p) for p in spec.params}
    params.update({k: batch[k] for k in ("preference", "margin") if k in spec.inputs and k in batch})
    if "delta" in spec.inputs:
        params["delta"] = delta if delta is not None else 0.0
    out = preference_loss(
        cfg.loss,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_lengths=n_chosen,
        rejected_lengths=n_rejected,
        **params,
    )
    losses, constraint_metrics = out.losses, {}
    if getattr(cfg, "constraints", None):  # (online DPO has none)
        # The constraint judges the same implicit reward as the objective, with its gradient.
        def reward(logps, reference_logps, n):
            norm = spec.length_normalised
            return implicit_rewards(logps, reference_logps, n, beta=cfg.beta, length_normalised=norm)

        extra, constraint_metrics = constraint_losses(
            cfg.constraints,
            chosen_rewards=reward(chosen, ref_chosen, n_chosen),
            rejected_rewards=reward(rejected, ref_rejected, n_rejected),
            chosen_logps=chosen,
            chosen_lengths=n_chosen,
            flagged=batch.get("flagged"),
        )
        losses = losses + extra
    if "corrupt_chosen" in policy:  # mDPO's conditional and anchor terms
        extra, mdpo_metrics = mdpo_terms(
            chosen, policy["corrupt_chosen"], ref_chosen, ref["corrupt_chosen"], beta=cfg.beta
        )
        losses = losses + extra
        constraint_metrics = {**constraint_metrics, **mdpo_metrics}
    margins = (out.chosen_rewards - out.rejected_rewards).detach()
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/chosen": out.chosen_rewards.detach().mean(),
        "rewards/rejected": out.rejected_rewards.detach().mean(),
        "rewards/accuracies": (margins > 0).float().mean(),
        "rewards/margins": margins.mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
        **out.metrics,
        **constraint_metrics,
    }
    return losses.mean(), metrics, out


@dataclass
class PairedObjective:
    """`loss_fn(model, batch)` for `fit`: the prepared policy's `pair_logps`, the reference's, then
    `paired_loss`; it keeps bco_pair's δ, the mean implicit reward of all previous training batches over
    every process (`gather`), which a checkpoint saves through state_dict()."""

    cfg: DPOConfig
    spec: LossSpec
    reference: Reference | None
    gather: object = lambda t: t
    reward_mean: RunningMean = field(default_factory=RunningMean)

    def __call__(self, model, batch: dict):
        policy = model(batch)
        ref = self.reference(model, batch) if self.spec.needs_reference else {}
        loss, metrics, out = paired_loss(
            self.cfg, self.spec, policy, ref, batch=batch, delta=self.reward_mean.mean
        )
        if "delta" in self.spec.inputs and model.training:  # evaluation does not move δ
            self.reward_mean.update(self.gather(torch.cat([out.chosen_rewards, out.rejected_rewards])))
        return loss, metrics


def train(cfg: DPOConfig, *, part: tuple[int, int] | None = None) -> Path:
    """Train a policy on preference pairs; returns the folder of the saved final model.

    part=(k, n) trains on the k-th of n contiguous parts of the rows (a stage of sdpo.py)."""
    if cfg.stages > 1 and part is None:
        raise ConfigError(
            "stages > 1 is stepwise DPO: run it with `alignkit dpo ... stages=N` or "
            "alignkit.algorithms.sdpo.train(cfg)"
        )
    check_reference_settings(cfg)
    if cfg.share_prompt and "flash" in (cfg.attn_implementation or ""):
        raise ValueError(
            "share_prompt needs a 4D attention mask, which flash attention does not take; "
            "set share_prompt=false or attn_implementation=sdpa"
        )
    spec = get_loss(cfg.loss)
    check_loss_settings(cfg, spec)
    is_vlm = check_vision_settings(cfg, spec)  # freeze_vision / mdpo* are for vision-language models
    accelerator, log, output_dir = start_run(cfg)
    if cfg.share_prompt and (window := shared_prompt_fits(cfg.model, cfg.max_length, cfg.trust_remote_code)):
        log(
            f"share_prompt off: {cfg.model} attends within a sliding window of {window} tokens, shorter than "
            f"max_length {cfg.max_length}, which the one-row layout's mask cannot express; chosen and rejected "
            "are read as separate rows"
        )
        cfg = dataclasses.replace(cfg, share_prompt=False)

    # Data: validated and tokenised before any model is loaded, so bad rows fail fast.
    vlm = vision_setup(cfg, log) if is_vlm else None  # a VLM's processor and batch layout
    tokenizer = (
        vlm.processor.tokenizer if vlm else load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    )
    prepare = vlm.prepare if vlm else prepare_preference_data
    train_examples, eval_examples = prepare(cfg, tokenizer, log)
    if part is not None:
        train_examples = stage_examples(train_examples, *part)
        log(f"stage {part[0]} of {part[1]}: {len(train_examples)} training pairs")
    check_row_columns(cfg, spec, train_examples, eval_examples)
    attach_flags(cfg, tokenizer, [train_examples, eval_examples], log)

    model = load_policy(cfg, tokenizer.pad_token_id, accelerator.device)
    if vlm and cfg.freeze_vision:
        log(f"freeze_vision: {freeze_vision(model):,} parameters of the vision tower and projector frozen")
    collate = make_collate(tokenizer.pad_token_id, cfg.share_prompt, vlm.layout if vlm else None)

    def logps(m, batch: dict) -> dict:
        return pair_logps(m, batch, cfg.logprob_chunk_size)

    def precompute(forward) -> None:
        # Only rows the run will train on (all of them unless max_steps ends it within the first epoch).
        used = [train_examples[i] for i in used_indices(cfg, len(train_examples), accelerator)]
        splits = {"train": used, "eval": eval_examples}
        fields = PAIR_FIELDS + (("images",) if vlm else ())
        attach_precomputed_reference(
            cfg, forward, splits, accelerator, collate=collate, fields=fields, log=log
        )

    # The reference: log-probs of the frozen starting point (or of `reference.model`).
    reference, setup_metrics = None, {}
    if spec.needs_reference:
        names = ("chosen", "rejected") + (("corrupt_chosen",) if cfg.mdpo else ())
        reference, setup_metrics = setup_reference(
            cfg, model, accelerator, logps, names=names, precompute=precompute
        )
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
        if vlm and cfg.freeze_vision:  # "all-linear" adapters in the vision tower stay at their zero start
            freeze_vision(model)
    model.train()
    objective = PairedObjective(cfg, spec, reference, accelerator.gather)

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
        state=objective.reward_mean if "delta" in spec.inputs else None,
    )

    saved_with = vlm.processor if vlm else tokenizer  # a VLM's processor saves its tokenizer too
    return save_final(accelerator, prepared, saved_with, output_dir, merge_lora=cfg.lora.merge, log=log)
