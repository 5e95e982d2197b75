"""Alignment transfer by distillation: generalised knowledge distillation (GKD, Agarwal et al. 2024).

    alignkit distill model=STUDENT teacher=ALIGNED_TEACHER data=prompts.jsonl output_dir=out

A student learns an aligned teacher's next-token distributions, token by token over the full vocabulary,
on completions of the training prompts. Every step (GKD's Algorithm 1) draws u ~ U(0, 1) from the run's
seed and step: with probability λ = `student_fraction` the step's completions are sampled from the
student (on-policy: it learns on its own mistakes), else from the teacher. The loss is the per-token
divergence (`alignkit.losses.distill`: forward KL, reverse KL or JSD(β)) averaged over every completion
token of the step, so it does not depend on how the step is split into micro-batches or processes.

Teacher and student may differ in size but must share the vocabulary (`vocabulary_mismatch`). Held-out
prompts (`eval_data` / `eval_fraction`) get one fixed teacher sample each, drawn once; the eval metric is
the per-token divergence on them, logged before the first step (step 0) and every `eval_steps`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from alignkit.config.base import TrainConfig
from alignkit.config.load import ConfigError, validate
from alignkit.config.supervised import DistillConfig
from alignkit.data.collate import collate_sft, completion_tokens
from alignkit.data.prompts import load_prompts
from alignkit.generation.resolve import with_resolved_backend
from alignkit.generation.sampling import sample_ids
from alignkit.losses.distill import divergence_beta
from alignkit.models.load import (
    BatchForward,
    check_model_source,
    load_policy,
    load_tokenizer,
    vocabulary_difference,
)
from alignkit.models.lora import add_lora
from alignkit.models.reference import frozen_model
from alignkit.models.teacher import completion_divergence, frozen_teacher
from alignkit.training.loop import OnlineRun
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import as_numbers, make_optimizer, optimizer_step


def check_distill_settings(cfg: DistillConfig) -> None:
    """Settings that cannot work, refused before anything loads."""
    validate(cfg)
    if not cfg.teacher:
        raise ConfigError("teacher is not set: give teacher=<the aligned model's hub name or folder>")
    if cfg.beta != DistillConfig.beta and cfg.divergence != "jsd":
        raise ConfigError(f"beta is used by divergence=jsd only (got divergence={cfg.divergence})")
    if cfg.max_length != TrainConfig.max_length:
        raise ConfigError("max_length is not used by distill: completions are generation.max_new_tokens long")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of grad_accum={cfg.grad_accum}")
    check_model_source(cfg.teacher, "teacher")


def vocabulary_mismatch(student: tuple[str, object, int], teacher: tuple[str, object, int]) -> str | None:
    """What keeps two models from being compared token by token, or None.

    student, teacher: (name, tokenizer, output vocabulary size of the model's head). Checks the head
    sizes, the tokenizers' token -> id maps and their BOS / EOS ids; the message names both models.
    """
    (s_name, s_tok, s_size), (t_name, t_tok, t_size) = student, teacher
    problems = []
    if s_size != t_size:
        problems.append(f"output vocabulary sizes differ (student {s_size}, teacher {t_size})")
    vocabulary = vocabulary_difference(
        s_tok.get_vocab(), t_tok.get_vocab(), ("the student's", "the teacher's")
    )
    if vocabulary:
        problems.append(vocabulary)
    for special in ("bos_token_id", "eos_token_id"):
        if getattr(s_tok, special) != getattr(t_tok, special):
            problems.append(
                f"{special} differs (student {getattr(s_tok, special)}, teacher {getattr(t_tok, special)})"
            )
    if not problems:
        return None
    return (
        f"student {s_name} and teacher {t_name} do not share a vocabulary: {'; '.join(problems)}. "
        "Distillation compares their next-token distributions token by token: use a student built on the "
        "teacher's tokenizer"
    )


def distill_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The token-mean divergence of a micro-batch (`optimizer_step` weights it by its completion tokens)."""
    out = model(batch)
    loss = out["divergence"].sum() / out["tokens"].sum().clamp(min=1)
    return loss, {"loss": loss.detach()}


def on_policy_step(seed: int, step: int, student_fraction: float) -> bool:
    """Whether step `step` samples from the student: u < λ for u ~ U(0, 1) drawn from (seed, step), the
    same on every process and in a resumed run."""
    u = torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    return bool(u < student_fraction)


def train(cfg: DistillConfig) -> Path:
    """Distil `teacher` into the student `model` on prompt rows; returns the saved final model's folder."""
    check_distill_settings(cfg)
    # generation.backend=auto -> loop where the lean loop drives both models, else hf; saved with the run.
    cfg = with_resolved_backend(cfg, {"model": cfg.model, "teacher": cfg.teacher})
    accelerator, log, output_dir = start_run(cfg)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    teacher_tokenizer = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    prompts = load_prompts(cfg, tokenizer, log)

    student = load_policy(cfg, tokenizer.pad_token_id, accelerator.device)
    teacher = frozen_model(cfg, cfg.teacher, accelerator.device)
    size = lambda m: m.get_output_embeddings().weight.shape[0]  # noqa: E731
    problem = vocabulary_mismatch(
        (cfg.model, tokenizer, size(student)), (cfg.teacher, teacher_tokenizer, size(teacher))
    )
    if problem:
        raise ValueError(problem)
    log(
        f"teacher {sum(p.numel() for p in teacher.parameters()):,} parameters, student "
        f"{sum(p.numel() for p in student.parameters()):,}"
    )
    if cfg.lora.enabled:
        student = add_lora(student, cfg.lora)
    student.train()
    beta = divergence_beta(cfg.divergence, cfg.beta)
    teacher_states = frozen_teacher(teacher)

    def divergence_of(m, batch: dict) -> dict:
        return completion_divergence(
            m,
            batch,
            teacher_states,
            beta=beta,
            temperature=cfg.distill_temperature,
            chunk_size=cfg.logprob_chunk_size,
        )

    def named() -> dict:
        return {
            "model": accelerator.unwrap_model(policy).model,
            "optimizer": optimizer,
            "scheduler": scheduler,
        }

    run = OnlineRun(cfg, accelerator, len(prompts.train_rows), named=named, log=log)
    optimizer, scheduler = make_optimizer(student, cfg, run.steps)
    policy, optimizer = accelerator.prepare(BatchForward(student, divergence_of), optimizer)
    run.resume()
    g = cfg.generation
    sampling = {
        "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_k": g.top_k or None,
        "top_p": g.top_p if g.top_p < 1 else None,
        "batch_size": g.batch_size,
        "backend": g.backend,
    }

    def examples_of(prompt_ids: list[list[int]], completions: list[list[int]]) -> list[dict]:
        return [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompt_ids, completions)]

    def to_device(batch: dict) -> dict:
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    # Held-out prompts: one teacher sample each, drawn once, the same for every evaluation.
    eval_examples = (
        examples_of(
            prompts.eval_ids, sample_ids(teacher, tokenizer, prompts.eval_ids, seed=cfg.seed + 1, **sampling)
        )
        if prompts.eval_ids
        else []
    )

    @torch.no_grad()
    def evaluate() -> dict:
        policy.eval()
        totals = {"divergence": 0.0, "tokens": 0.0}
        for start in range(0, len(eval_examples), cfg.batch_size):
            batch = to_device(
                collate_sft(eval_examples[start : start + cfg.batch_size], tokenizer.pad_token_id)
            )
            with accelerator.autocast():
                out = policy(batch)
            for k in totals:
                totals[k] = totals[k] + out[k].sum()
        policy.train()
        totals = as_numbers(totals)
        return {"divergence": totals["divergence"] / max(totals["tokens"], 1.0)}

    if eval_examples and run.step == 0:
        run.logger.log({"step": 0, "split": "eval", **evaluate()})

    with run.interruptible():
        while run.step < run.steps:
            t0 = time.perf_counter()
            idx, seed = run.step_prompts()
            prompt_ids = [prompts.train_ids[i] for i in idx]
            on_policy = on_policy_step(cfg.seed, run.step, cfg.student_fraction)
            sampler = accelerator.unwrap_model(policy).model if on_policy else teacher
            examples = examples_of(
                prompt_ids, sample_ids(sampler, tokenizer, prompt_ids, seed=seed, **sampling)
            )
            t1 = time.perf_counter()
            micro = len(examples) // cfg.grad_accum
            groups = [examples[m : m + micro] for m in range(0, len(examples), micro)]
            record = optimizer_step(
                accelerator,
                policy,
                optimizer,
                scheduler,
                micro_batches=[to_device(collate_sft(g, tokenizer.pad_token_id)) for g in groups],
                loss_fn=distill_loss,
                units=[completion_tokens(g) for g in groups],
                max_grad_norm=cfg.max_grad_norm,
            )
            record = as_numbers(record)
            t2 = time.perf_counter()
            record.update(
                {
                    "on_policy": float(on_policy),
                    "completion_length": completion_tokens(examples) / len(examples),
                    "time/generation": t1 - t0,
                    "time/training": t2 - t1,
                }
            )
            run.finish_step(record, evaluate if eval_examples else None, {"loss": record["loss"]})
    return save_final(accelerator, policy, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
