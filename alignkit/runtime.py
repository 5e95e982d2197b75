"""Shared training glue: accelerate set-up, data order, optimizer and schedule, the offline loop,
metrics, and atomic, resumable checkpoints.

`fit` is the optimisation loop every offline objective (SFT, DPO family, reward models) runs: the
algorithm supplies `loss_fn(batch) -> (loss, metrics)` and the data; `fit` owns accumulation, clipping,
logging, evaluation, checkpoints, resume and Ctrl-C. Online algorithms (PPO, GRPO) will call the same
pieces (`Checkpointer`, `MetricsLogger`, `make_optimizer`) from their own loops.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.config import TrainConfig


def make_accelerator(cfg: TrainConfig):
    """An accelerate Accelerator for the config (mixed precision, seeding)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision '{cfg.mixed_precision}' is not one of no, bf16, fp16")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    return accelerator


def start_run(cfg: TrainConfig):
    """(accelerator, log, output_dir) for a training command; the resolved config is saved first.

    `log` prints on the main process only.
    """
    from alignkit.config import save_config

    accelerator = make_accelerator(cfg)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        save_config(cfg, output_dir)
    return accelerator, log, output_dir


@dataclass
class DataOrder:
    """Which examples each optimizer step uses: a seeded permutation per epoch, no state to save.

    A global step consumes `grad_accum` micro-batches of `batch_size` rows on each of `world` processes.
    Step s of a resumed run sees exactly the rows step s of the uninterrupted run saw.
    """

    n_examples: int
    batch_size: int
    grad_accum: int
    seed: int
    world: int = 1
    rank: int = 0
    shuffle: bool = True
    lengths: list[int] | None = None
    """Per-example lengths: when given (and shuffling), each step's rows are of similar length (see
    `group_by_length`), so padded batches waste little; None keeps the plain random order."""

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.rows_per_step

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_examples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n_examples, generator=g).tolist()
        if self.lengths is None:
            return perm
        return group_by_length(perm, self.lengths, self.rows_per_step, g)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's `grad_accum` micro-batches (lists of example indices) for global step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        rows = self.permutation(epoch)[k * self.rows_per_step : (k + 1) * self.rows_per_step]
        per_micro = self.batch_size * self.world
        out = []
        for m in range(self.grad_accum):
            micro = rows[m * per_micro : (m + 1) * per_micro]
            out.append(micro[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
        return out


def group_by_length(perm: list[int], lengths: list[int], rows_per_step: int, g: torch.Generator) -> list[int]:
    """`perm` reordered so that each run of `rows_per_step` rows holds examples of similar length.

    As transformers' LengthGroupedSampler: the random permutation is cut into mega-batches of up to 50
    steps (at most a quarter of the data, so batches still mix differently every epoch), each is sorted
    by length, cut into steps, and the steps are shuffled. A step's micro-batches are then padded to
    nearly the same length instead of to the longest row of a random draw.
    """
    steps_per_mega = max(1, min(len(perm) // (4 * rows_per_step), 50))
    mega = steps_per_mega * rows_per_step
    full, partial = [], []
    for start in range(0, len(perm), mega):
        chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])
        for s in range(0, len(chunk), rows_per_step):
            (full if len(chunk) - s >= rows_per_step else partial).append(chunk[s : s + rows_per_step])
    order = torch.randperm(len(full), generator=g).tolist()
    return [i for k in order for i in full[k]] + [i for step in partial for i in step]


def data_order(cfg: TrainConfig, n_examples: int, accelerator, lengths: list[int] | None = None) -> DataOrder:
    """The run's DataOrder for `n_examples` training examples (length-grouped when `lengths` is given)."""
    return DataOrder(
        n_examples,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.seed,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.shuffle,
        lengths,
    )


def used_indices(cfg: TrainConfig, n_examples: int, accelerator) -> list[int]:
    """Indices of the training examples the run's steps will visit on this process (all of them for
    whole epochs; fewer when max_steps stops early), so one-off passes skip rows never trained on."""
    order = data_order(cfg, n_examples, accelerator)
    steps = total_steps(cfg, order)
    if steps >= order.steps_per_epoch:
        return list(range(n_examples))
    return sorted({i for s in range(steps) for mb in order.micro_batches(s) for i in mb})


def total_steps(cfg: TrainConfig, order: DataOrder) -> int:
    """max_steps, or epochs x steps per epoch."""
    if order.steps_per_epoch == 0:
        raise ValueError(
            f"{order.n_examples} training examples are fewer than one optimizer step needs "
            f"(batch_size x grad_accum x processes = {order.rows_per_step}); lower batch_size"
        )
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * order.steps_per_epoch))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps: int):
    """AdamW over the trainable parameters and a warm-up + linear/cosine/constant schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_scheduler == "constant":
            return 1.0
        raise ValueError(f"lr_scheduler '{cfg.lr_scheduler}' is not one of linear, cosine, constant")

    factor(0)  # validate the schedule name before training starts
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


class MetricsLogger:
    """Appends one JSON object per line to output_dir/metrics.jsonl (main process only)."""

    def __init__(self, output_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            # Drop lines from steps after the checkpoint: the resumed run writes them again.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Checkpointer:
    """Atomic checkpoints (written to a temporary folder, then renamed), keeping the last `keep`.

    A checkpoint holds the trainable weights (safetensors), optimizer and schedule state, RNG states and
    the step, which with `DataOrder` is all a resumed run needs to repeat the uninterrupted one exactly.
    """

    def __init__(self, output_dir: Path, keep: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = max(keep, 1)

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return found[-1] if found else None

    def save(self, step: int, model, optimizer, scheduler, extra: dict | None = None) -> Path:
        final = self.root / f"checkpoint-{step}"
        tmp = self.root / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        state = {"step": step, "scheduler": scheduler.state_dict(), "python_random": random.getstate()}
        (tmp / "state.json").write_text(json.dumps({**state, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(self.root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[
            : -self.keep
        ]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise ValueError(
                f"{path}: checkpoint has weights the model lacks (e.g. {missing[0]}); wrong model?"
            )
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        state = json.loads((path / "state.json").read_text())
        scheduler.load_state_dict(state["scheduler"])
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        version, internal, gauss = state["python_random"]
        random.setstate((version, tuple(internal), gauss))
        return state


def _mean_metrics(records: list[dict]) -> dict:
    keys = records[0].keys()
    return {k: sum(r[k] for r in records) / len(records) for k in keys}


def fit(
    cfg: TrainConfig,
    accelerator,
    model: torch.nn.Module,
    train_examples: list[dict],
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
    evaluate: Callable[[], dict] | None = None,
    loss_scale: Callable[[list[list[dict]]], list[float]] | None = None,
    setup_metrics: dict | None = None,
    state=None,
    lengths: list[int] | None = None,
    summarise: Callable[[dict], dict] | None = None,
) -> dict:
    """Run the optimisation loop; returns the last logged train metrics.

    loss_fn(batch) returns the micro-batch loss (a mean over its rows, or as scaled by `loss_scale`) and
    a dict of float metrics. loss_scale(micro_batches) may return one factor per micro-batch that
    replaces the default 1/grad_accum (token-mean losses use it so that the result does not depend on
    how a step is split into micro-batches). setup_metrics (e.g. the seconds a one-off reference pass
    took) are added to the first logged record. state, an object with state_dict() / load_state_dict()
    (e.g. a loss's running statistics), is saved in every checkpoint as it was at the end of that step and
    restored on resume, so a resumed run repeats the uninterrupted one exactly. lengths (one per
    training example) makes every step draw rows of similar length (`group_by_length`). summarise(record)
    derives the logged metrics from a step's averaged ones (e.g. a class's mean reward from its sum and
    count, which stays exact when a micro-batch holds no row of that class).
    """
    output_dir = Path(cfg.output_dir)
    order = data_order(cfg, len(train_examples), accelerator, lengths)
    steps = total_steps(cfg, order)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(output_dir, cfg.save_total_limit)

    start = 0
    latest = checkpointer.latest() if cfg.resume else None
    if cfg.resume and latest is None and accelerator.is_main_process:
        print(f"resume=true but no checkpoint in {checkpointer.root}; starting from step 0")
    if latest is not None:
        loaded = checkpointer.load(latest, accelerator.unwrap_model(model), optimizer, scheduler)
        start = loaded["step"]
        if state is not None and "loop_state" in loaded:
            state.load_state_dict(loaded["loop_state"])
        if accelerator.is_main_process:
            print(f"resumed from {latest} at step {start}")
    logger = MetricsLogger(output_dir, accelerator.is_main_process, start if latest is not None else None)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        initial=start,
        disable=not (cfg.progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    last: dict = {}
    step = start
    snapshot = state.state_dict() if state is not None else None  # as at the end of step `step`
    try:
        while step < steps:
            model.train()
            t0 = time.perf_counter()
            micro = [[train_examples[i] for i in idx] for idx in order.micro_batches(step)]
            scales = loss_scale(micro) if loss_scale else [1.0 / len(micro)] * len(micro)
            records, tokens = [], 0
            for m, (examples, scale) in enumerate(zip(micro, scales)):
                batch = {k: v.to(accelerator.device) for k, v in collate(examples).items()}
                tokens += int(batch["attention_mask"].sum())
                sync = m == len(micro) - 1
                ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    loss, metrics = loss_fn(batch)
                    accelerator.backward(loss * scale)
                records.append(metrics)
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else torch.sqrt(
                    sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)
                )
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if state is not None:
                snapshot = state.state_dict()
            elapsed = time.perf_counter() - t0
            record = _mean_metrics(records)
            record = {
                k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                for k, v in record.items()
            }
            if summarise is not None:
                record = summarise(record)
            record.update(
                grad_norm=float(grad_norm),
                lr=lr,
                tokens=tokens * accelerator.num_processes,
                step_time=elapsed,
                **{"tokens/s": tokens * accelerator.num_processes / elapsed},
            )
            if step == start + 1 and setup_metrics:
                record.update(setup_metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens/s']:.0f}")
            if step % cfg.logging_steps == 0 or step == steps:
                last = {"step": step, "split": "train", **record}
                logger.log(last)
            if evaluate is not None and (step % cfg.eval_steps == 0 or step == steps):
                model.eval()
                with torch.no_grad(), accelerator.autocast():
                    logger.log({"step": step, "split": "eval", **evaluate()})
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < steps:
                _save(checkpointer, accelerator, step, model, optimizer, scheduler, snapshot)
    except KeyboardInterrupt:
        bar.close()
        if accelerator.is_main_process:
            path = _save(checkpointer, accelerator, step, model, optimizer, scheduler, snapshot)
            print(f"\ninterrupted: checkpoint written to {path}; continue with resume=true")
        raise SystemExit(130) from None
    bar.close()
    return last


def evaluate_in_batches(
    examples: list[dict], batch_size: int, collate: Callable, loss_fn: Callable, device
) -> dict:
    """Every metric of `loss_fn` over `examples`, in batches, each batch weighted by its rows."""
    totals: dict[str, float] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        _, metrics = loss_fn(batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
    return {k: v / len(examples) for k, v in totals.items()}


def save_final(accelerator, model, tokenizer, output_dir: Path, merge_lora: bool, log=print) -> Path:
    """Save the trained model (save_pretrained, safetensors) to output_dir/final on the main process."""
    from alignkit.models import save_model

    final = Path(output_dir) / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, final, merge_lora=merge_lora)
        log(f"final model saved to {final}")
    return final


def _save(checkpointer, accelerator, step, model, optimizer, scheduler, loop_state=None) -> Path | None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        extra = {"loop_state": loop_state} if loop_state is not None else None
        return checkpointer.save(step, accelerator.unwrap_model(model), optimizer, scheduler, extra)
    return None
