"""Stepwise DPO (sDPO, Kim et al. 2024, "sDPO: Don't Use Your Data All at Once"): DPO in stages, each
against the previous stage's model as its reference.

    alignkit dpo model=PATH data=pairs.jsonl stages=3 output_dir=out

The training rows are split, in file order, into `stages` contiguous parts (`dpo.stage_examples`), so
put easier pairs first for a curriculum, as the paper does. Stage k is an ordinary `dpo.train(part=(k, stages))` run on
part k that starts from, and is measured against, the final model of stage k−1 (stage 1: `model`,
against `reference.model` or `model`): the reference gets better aligned from stage to stage, so each
stage's implicit rewards are relative to a stronger, not the initial, model. Every stage has its own
learning-rate schedule (max_steps / epochs are per stage) and writes output_dir/stage-k/ (resolved config,
metrics, checkpoints, final model); output_dir/final links to the last stage's final model. With
resume=true, stages whose final model exists are skipped and the interrupted one resumes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alignkit.algorithms import dpo
from alignkit.config.load import save_config
from alignkit.config.preference import DPOConfig
from alignkit.training.rundir import claim_output_dir, part_resume_flags
from alignkit.training.setup import process_state


def stage_config(cfg: DPOConfig, k: int, previous_final: Path | None) -> DPOConfig:
    """Stage k's config: output in stage-k/, policy and reference = the previous stage's final model
    (stage 1 keeps `model` and `reference.model`); one shared cache."""
    root = Path(cfg.output_dir)
    stage = dataclasses.replace(
        cfg, output_dir=str(root / f"stage-{k}"), cache_dir=cfg.cache_dir or str(root / "cache")
    )
    if previous_final is not None:
        stage.model = str(previous_final)
        stage.reference = dataclasses.replace(cfg.reference, model=str(previous_final))
    return stage


def train(cfg: DPOConfig) -> Path:
    """Run stages 1..cfg.stages in turn; returns the last stage's final model folder."""
    if cfg.lora.enabled and not cfg.lora.merge:
        raise ValueError(
            "stages > 1 with LoRA needs lora.merge=true: each stage loads the previous stage's final model "
            "as its policy and reference, which must be full weights"
        )
    state = process_state()
    main_process = state.is_main_process
    root = Path(cfg.output_dir)
    # The stages' own folders are claimed by their runs; the root's config.yaml, final link and stage-*
    # folders are this run's: another sDPO run there is refused, continued or replaced as a whole.
    claim_output_dir(root, resume=cfg.resume, overwrite=cfg.overwrite, remove=main_process)
    state.wait_for_everyone()
    if main_process:
        save_config(cfg, root)
    final = None
    for k in range(1, cfg.stages + 1):
        stage = stage_config(cfg, k, final)
        done = Path(stage.output_dir) / "final" / "config.json"
        if cfg.resume and done.exists():
            print(f"sDPO stage {k} of {cfg.stages}: already trained ({done.parent}); skipped")
            final = done.parent
            continue
        if cfg.resume:  # the stage cut short: from its checkpoint, or again when it left none
            stage.resume, stage.overwrite = part_resume_flags(stage.output_dir)
        if main_process:
            print(
                f"sDPO stage {k} of {cfg.stages}: from {stage.model}, against {stage.reference.model or stage.model}"
            )
        final = dpo.train(stage, part=(k, cfg.stages))
    link = root / "final"
    if main_process:
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(final.relative_to(root), target_is_directory=True)
    return final
