"""Rejection-sampling DPO (RS-DPO, Khaki et al. 2024) and iterative DPO (Xiong et al. 2024; Snorkel's
"iterative DPO"): rounds of sample -> score -> pair -> DPO.

    alignkit iterative-dpo model=PATH data=prompts.jsonl 'rewards=[{type: vader}]' rounds=2 output_dir=out

Round k (output_dir/round-k/):
  1. samples.jsonl: `num_generations` completions of each of the round's prompts from the current policy
     (round 1: `model`), sampled on token ids, each scored by the reward set (per source and total) or
     ranked by a pairwise LLM judge (`judge:`; `pairs.JudgeRanking`);
  2. pairs.jsonl: `data.pairs.build_pairs` keeps pairs whose score gap exceeds `min_gap` (best vs worst of
     each prompt, or every such pair: RS-DPO), with the gap as the sigmoid loss's margin or soft label when
     `gap_as` says so; rows carry the token ids as sampled, so DPO trains on exactly those ids;
  3. train/: an ordinary `dpo.train` on those pairs (any paired objective), from the current policy, against
     that policy (`update_reference=true`, the usual iterative DPO) or against `model` throughout.
output_dir/metrics.jsonl has one line per round (step = round): the samples' reward, the pairs, the round's
last DPO metrics and, with eval prompts, the new policy's held-out reward (step 0: the starting model's).
With resume=true, finished rounds are skipped, a round's saved samples and pairs are reused (nothing is
sampled or scored twice) and its DPO run resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from alignkit.algorithms import dpo
from alignkit.config.load import ConfigError, save_config, validate
from alignkit.config.preference import DPOConfig, IterativeDPOConfig
from alignkit.data.pairs import build_pairs, pair_columns
from alignkit.data.prompts import Prompts, load_prompts
from alignkit.evaluation.policy import evaluate_policy
from alignkit.generation.resolve import with_resolved_backend
from alignkit.io import atomic_write, read_jsonl, write_jsonl
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSet
from alignkit.rewards.ranking import JudgeRanking
from alignkit.rewards.registry import build_reward
from alignkit.rollout import collect, run_sampler, sampling_settings
from alignkit.training.loop import MetricsLogger
from alignkit.training.rundir import check_resumed_backend, claim_output_dir, part_resume_flags
from alignkit.training.setup import process_state, resolve_mixed_precision


def check_settings(cfg: IterativeDPOConfig) -> None:
    """What must hold before anything loads."""
    validate(cfg)
    if bool(cfg.rewards) == bool(cfg.judge):
        raise ConfigError(
            "give either rewards (a reward set scoring each completion) or judge (a pairwise judge)"
        )
    if cfg.gap_as != "none" and cfg.loss != "sigmoid":
        raise ConfigError(
            f"gap_as={cfg.gap_as} feeds the pairs' gaps to the loss, which only loss=sigmoid reads"
        )
    if cfg.max_pairs_per_prompt and cfg.pairs != "all":
        raise ConfigError("max_pairs_per_prompt caps pairs=all; best_worst makes one pair per prompt")
    if cfg.stages != 1:
        raise ConfigError("stages (stepwise DPO) does not combine with rounds; use rounds")
    if cfg.rounds > 1 and cfg.lora.enabled and not cfg.lora.merge:
        raise ConfigError(
            "rounds > 1 with LoRA needs lora.merge=true: each round starts from the last one's weights"
        )
    dpo.check_loss_settings(cfg, dpo.get_loss(cfg.loss))


def round_prompts(n: int, per_round: int, k: int, seed: int) -> list[int]:
    """Indices of round k's (1-based) prompts: all n, or the k-th slice of `per_round` of one seeded shuffle
    (wrapping around)."""
    if not per_round or per_round >= n:
        return list(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    start = (k - 1) * per_round
    return [perm[(start + i) % n] for i in range(per_round)]


def sample_round(
    policy, tokenizer, prompts: Prompts, idx: list[int], *, scorer, cfg, seed: int, sampler=None
) -> list[dict]:
    """One row per prompt: its token ids and its k completions (text, token ids as sampled, per-source
    scores, total), drawn by `sampler` (synced to `policy`; default: `policy` itself)."""
    K = cfg.num_generations
    rollout = collect(
        policy,
        tokenizer,
        [prompts.train_ids[i] for i in idx],
        [prompts.train_rows[i].reward_input for i in idx],
        rewards=scorer,
        group_size=K,
        sampling=sampling_settings(cfg),  # (the `generation:` section OnlineConfig has too)
        seed=seed,
        update_rewards=False,
        sampler=sampler,
        columns=[prompts.train_rows[i].columns for i in idx],
        origins=[prompts.train_rows[i].origin for i in idx],
    )
    completion_ids = rollout.completion_ids()
    rows = []
    for n, i in enumerate(idx):
        candidates = []
        for r in range(n * K, (n + 1) * K):
            scores = {name: float(s[r]) for name, s in rollout.source_scores.items()}
            candidates.append(
                {
                    "text": rollout.completions[r],
                    "ids": completion_ids[r],
                    "scores": scores,
                    "total": float(rollout.scores[r]),
                }
            )
        row = prompts.train_rows[i]
        rows.append(
            {"index": i, "prompt": row.prompt, "prompt_ids": prompts.train_ids[i], "candidates": candidates}
        )
    return rows


def pair_rows(samples: list[dict], cfg: IterativeDPOConfig) -> tuple[list[dict], dict]:
    """Preference rows (texts, token ids, scores, gap, and margin / preference per `gap_as`) from a round's
    samples, and the pair statistics."""
    scores = torch.tensor([[c["total"] for c in s["candidates"]] for s in samples], dtype=torch.float64)
    ids = [[c["ids"] for c in s["candidates"]] for s in samples]
    pairs, stats = build_pairs(
        scores,
        strategy=cfg.pairs,
        min_gap=cfg.min_gap,
        max_pairs_per_prompt=cfg.max_pairs_per_prompt,
        completions=ids,
    )
    rows = []
    for p in pairs:
        s = samples[p.prompt]
        chosen, rejected = s["candidates"][p.chosen], s["candidates"][p.rejected]
        rows.append(
            {
                "prompt": s["prompt"],
                "chosen": chosen["text"],
                "rejected": rejected["text"],
                "prompt_ids": s["prompt_ids"],
                "chosen_ids": chosen["ids"],
                "rejected_ids": rejected["ids"],
                "chosen_score": chosen["total"],
                "rejected_score": rejected["total"],
                "gap": p.gap,
                **pair_columns(p.gap, cfg.gap_as, cfg.soft_label_temperature),
            }
        )
    return rows, stats.as_dict()


def round_config(cfg: IterativeDPOConfig, k: int, policy: str, pairs_path: Path) -> DPOConfig:
    """Round k's DPO run: from `policy` on the round's pairs, in round-k/train, resumed when it left a
    checkpoint (a round cut short before its first checkpoint starts again)."""
    train_dir = Path(cfg.output_dir) / f"round-{k}" / "train"
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DPOConfig)}
    run = DPOConfig(**shared)
    run.model, run.data, run.output_dir = policy, str(pairs_path), str(train_dir)
    run.eval_data, run.eval_fraction = None, 0.0
    # The pairs are pre-tokenised text: their prompts were rendered with the template settings already.
    run.system_prompt, run.chat_template_kwargs = None, {}
    run.cache_dir = str(train_dir / "cache")
    if cfg.update_reference:  # the round's own starting policy (round 1: `reference.model`, if given)
        run.reference = dataclasses.replace(cfg.reference, model=cfg.reference.model if k == 1 else None)
    else:
        run.reference = dataclasses.replace(cfg.reference, model=cfg.reference.model or cfg.model)
    run.resume, run.overwrite = part_resume_flags(train_dir)
    return run


def metric_lines(run_dir: Path) -> list[dict]:
    """The complete lines of a run's metrics.jsonl (none when it has none; a line torn by a kill is left out)."""
    path = run_dir / "metrics.jsonl"
    return read_jsonl(path).records


def last_train_metrics(train_dir: Path) -> dict:
    """The last train line of a round's DPO metrics, its keys prefixed with dpo/."""
    train = [r for r in metric_lines(train_dir) if r.get("split") == "train"]
    if not train:
        return {}
    skip = ("step", "split", "epoch", "step_time", "tokens/s")  # (timings of one step say little of a round)
    return {f"dpo/{k}": v for k, v in train[-1].items() if k not in skip}


def train(cfg: IterativeDPOConfig) -> Path:
    """Run the rounds; returns the last round's final model folder (also linked as output_dir/final)."""
    check_settings(cfg)
    cfg = with_resolved_backend(cfg)  # generation.backend=auto -> loop or hf, saved with the run
    state = process_state()
    main = state.is_main_process
    log = print if main else (lambda *a, **k: None)
    root = Path(cfg.output_dir)
    # The rounds' DPO folders are claimed by their runs; the root (config, metrics, round-* samples and
    # pairs, final link) is this run's, refused, continued or replaced as a whole.
    claim_output_dir(root, resume=cfg.resume, overwrite=cfg.overwrite, remove=main)
    if cfg.resume:
        check_resumed_backend(root, cfg.generation.backend)
    state.wait_for_everyone()
    if main:
        save_config(cfg, root)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    K = cfg.num_generations
    scorer = (
        JudgeRanking(build_reward(cfg.judge, "judge"), K) if cfg.judge else RewardSet.from_specs(cfg.rewards)
    )
    prompts = load_prompts(cfg, tokenizer, log, columns=getattr(scorer, "columns", ()))
    # The reward set scores the eval prompts too (held frozen: both pass update_rewards=False); a pairwise
    # judge, the alternative (check_settings), cannot score lone completions.
    evaluator = scorer if isinstance(scorer, RewardSet) and prompts.eval_rows else None
    if prompts.eval_rows and evaluator is None:
        log(
            "eval prompts are not scored: a pairwise judge ranks completions of one prompt, and no rewards are given"
        )

    done = [k for k in range(1, cfg.rounds + 1) if (root / f"round-{k}" / "round.json").exists()]
    resumed = max(done) if cfg.resume and done else 0  # rounds finished before
    start_logged = cfg.resume and any(r.get("step") == 0 for r in metric_lines(root))
    logger = MetricsLogger(root, main, resume_step=resumed if cfg.resume else None)
    policy_path = Path(cfg.model) if not resumed else root / f"round-{resumed}" / "train" / "final"
    if resumed:
        log(f"resuming after round {resumed} of {cfg.rounds}")

    def load(path):
        model = load_causal_lm(
            str(path), cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code, device=state.device
        )
        return model.eval()

    def synced(model, version: int):
        sampler.sync(model, version)
        return sampler

    def held_out(model, version: int) -> dict:
        scores = evaluate_policy(
            model,
            tokenizer,
            prompts,
            evaluator,
            sampling=sampling_settings(cfg),
            seed=cfg.seed + 1,
            sampler=synced(model, version),
        )
        return {f"eval/{k}": v for k, v in scores.items()}

    policy = load(policy_path)
    # The sampler follows the policy of every round (version: rounds done); vllm starts from cfg.model.
    sampler = run_sampler(
        cfg, policy, tokenizer, prompts, mixed_precision=resolve_mixed_precision(cfg.mixed_precision)
    )
    if not start_logged and evaluator is not None:
        logger.log({"step": 0, "round": 0, **held_out(policy, resumed)})
    for k in range(resumed + 1, cfg.rounds + 1):
        rdir = root / f"round-{k}"
        rdir.mkdir(parents=True, exist_ok=True)
        samples_path, pairs_path = rdir / "samples.jsonl", rdir / "pairs.jsonl"
        have_samples = samples_path.exists()  # (written whole, so present means complete)
        state.wait_for_everyone()  # every process has looked before one writes
        if not have_samples:
            # Each process samples and scores its share of the round's prompts (its own seed; process 0's is
            # a 1-process run's), then the main process merges the shares in prompt order.
            idx = round_prompts(len(prompts.train_rows), cfg.prompts_per_round, k, cfg.seed)
            rank, world = state.process_index, state.num_processes
            mine = idx[rank::world]
            log(
                f"round {k} of {cfg.rounds}: sampling {K} completions of {len(idx)} prompts from {policy_path}"
            )
            seed = cfg.seed * 1000 + k + 7919 * rank
            share = (
                sample_round(
                    policy,
                    tokenizer,
                    prompts,
                    mine,
                    scorer=scorer,
                    cfg=cfg,
                    seed=seed,
                    sampler=synced(policy, k - 1),
                )
                if mine
                else []
            )
            write_jsonl(rdir / f"samples.part-{rank}.jsonl", share)
            state.wait_for_everyone()
            if main:
                parts = [rdir / f"samples.part-{r}.jsonl" for r in range(world)]
                by_index = {row["index"]: row for part in parts for row in read_jsonl(part).records}
                write_jsonl(samples_path, [by_index[i] for i in idx])
                for part in parts:
                    part.unlink()
            state.wait_for_everyone()
        samples = read_jsonl(samples_path).records
        if have_samples:
            log(f"round {k}: {len(samples)} prompts' samples read back from {samples_path}")
        rows, pair_stats = pair_rows(samples, cfg)
        if not rows:
            raise RuntimeError(
                f"round {k}: no pair's score gap exceeds min_gap={cfg.min_gap} ({pair_stats}); sample more "
                "completions (num_generations), raise the temperature or lower min_gap"
            )
        if main:
            write_jsonl(pairs_path, rows)
        state.wait_for_everyone()
        totals = torch.tensor([c["total"] for s in samples for c in s["candidates"]])
        log(f"round {k}: mean score {float(totals.mean()):.4f}; {len(rows)} pairs")
        final = dpo.train(round_config(cfg, k, str(policy_path), pairs_path))
        record = {
            "step": k,
            "round": k,
            "reward": float(totals.mean()),
            "reward_std": float(totals.std(unbiased=False)),
            "best_of_k": float(
                torch.tensor([max(c["total"] for c in s["candidates"]) for s in samples]).mean()
            ),
            **pair_stats,
            **last_train_metrics(rdir / "train"),
        }
        policy_path, policy = final, load(final)
        if evaluator is not None:
            record.update(held_out(policy, k))
        logger.log(record)
        if main:
            atomic_write(rdir / "round.json", json.dumps(record, indent=1))
    link = root / "final"
    if main:
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(Path(policy_path).relative_to(root), target_is_directory=True)
        if cfg.report:
            from alignkit.report.build import report_after_run

            report_after_run(root, log)
    return Path(policy_path)
