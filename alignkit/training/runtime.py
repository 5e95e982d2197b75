"""Shared training glue: accelerate set-up, data order, optimizer and schedule, the optimizer step, the
offline loop, and metrics.

`optimizer_step` is one step of any algorithm: micro-batches (no gradient sync but on the last) ->
clip -> step -> schedule -> metrics reduced across processes once. `fit` is the loop every offline
objective (SFT, DPO family, reward models) runs around it: the algorithm supplies
`loss_fn(model, batch) -> (loss, metrics)`, called with the *prepared* model, and the data; `fit` owns
data order, logging, evaluation, checkpoints (`alignkit.training.checkpoint`), resume and Ctrl-C (`Interrupts`:
finish the step or drop it, never save half of one). Online
algorithms (PPO, GRPO) call `optimizer_step`, `Checkpointer` and `MetricsLogger` from their own loops.

Distributed runs (`torchrun`, `accelerate launch`) get one run over N processes: every process draws its
own share of each step (`DataOrder`), the loss of a step is the mean over the rows (or tokens) of all
processes, and only the main process writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config.base import MIXED_PRECISION, TrainConfig
from alignkit.io import atomic_write, read_jsonl
from alignkit.training.checkpoint import Checkpointer, Frozen, default_fingerprint
from alignkit.training.tracking import check_report_to, finish_trackers, log_record, start_trackers


def native_bf16() -> bool:
    """Whether this machine computes bf16 in hardware: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX. Elsewhere (e.g. AMD Zen 3, most laptops) bf16 is emulated and slower than fp32, often ~10x."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_mixed_precision(setting: str) -> str:
    """The accelerate mixed-precision mode for `mixed_precision`: auto is what an `accelerate launch`
    config asks for, else bf16 where the device computes it natively, else no (fp32). An explicit bf16 on
    a CPU that emulates it warns, naming the flag."""
    if setting not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision '{setting}' is not one of {', '.join(MIXED_PRECISION)}")
    if setting == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "")  # set by `accelerate launch` configs
        if launcher in ("no", "bf16", "fp16"):
            return launcher
        return "bf16" if native_bf16() else "no"
    if setting == "bf16" and not torch.cuda.is_available() and not native_bf16():
        warnings.warn(
            "mixed_precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated here and a step "
            "can take ~10x longer than in fp32; use mixed_precision=auto (fp32 on this CPU)",
            stacklevel=2,
        )
    return setting


def distributed_cpu() -> bool:
    """Launched as several processes on a machine without CUDA: they must join one gloo process group
    (accelerate's `cpu=True`), or each would think it is the only one."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's PartialState (process index, main process, barriers) for a command that runs several
    trainings in one process (sDPO's stages, iterative DPO's rounds), joined as `make_accelerator` joins."""
    from accelerate import PartialState

    return PartialState(cpu=distributed_cpu())


def make_accelerator(cfg: TrainConfig):
    """An accelerate Accelerator for the config (mixed precision, seeding, `report_to` trackers).

    Launched as several processes (`torchrun`, `accelerate launch`) on a machine without CUDA, the
    processes join one gloo process group (accelerate's `cpu=True`); without it each process would
    train alone on the same rows.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # mixed precision; a process that runs several trainings (a notebook, sDPO's stages, the tests) starts
    # each from a fresh one. The distributed PartialState (the process group) is kept.
    from accelerate.state import AcceleratorState

    if hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state(reset_partial_state=False)
    tracked = check_report_to(cfg.report_to)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=distributed_cpu(),
        log_with=cfg.report_to if tracked else None,
        project_dir=cfg.output_dir if tracked else None,
    )
    set_seed(cfg.seed)
    return accelerator


def start_run(cfg: TrainConfig, *, check_sources: Callable | None = None):
    """(accelerator, log, output_dir) for a training command; the resolved config is saved first.

    Before anything loads: the settings are range-checked, the model folders checked (`check_sources(cfg)`,
    default `models.check_run_sources`; a diffusion pipeline has other folders), and output_dir claimed
    (`claim_run_dir`). `log` prints on the main process only.
    """
    from alignkit.config.load import save_config, validate
    from alignkit.models.load import check_run_sources

    validate(cfg)
    (check_sources or check_run_sources)(cfg)
    accelerator = make_accelerator(cfg)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    output_dir = Path(cfg.output_dir)
    claim_run_dir(cfg, accelerator)
    if accelerator.is_main_process:
        save_config(cfg, output_dir)
    start_trackers(accelerator, cfg)
    return accelerator, log, output_dir


def claim_run_dir(cfg: TrainConfig, accelerator) -> None:
    """A fresh run never destroys or splices another: output_dir holding a run is an error unless
    resume=true (under the same settings: the checkpoint's fingerprint) or overwrite=true (the main
    process deletes that run's files first). See alignkit.training.rundir."""
    from alignkit.training.checkpoint import run_fingerprint
    from alignkit.training.rundir import claim_output_dir

    claim_output_dir(
        cfg.output_dir,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        fingerprint=run_fingerprint(cfg),
        defaults=default_fingerprint(cfg),
        remove=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()


@dataclass
class DataOrder:
    """Which examples each optimizer step uses: a seeded stream of epoch permutations, no state to save.

    The permutations of epochs 0, 1, 2, ... are laid end to end and cut into steps of `rows_per_step` =
    batch_size x grad_accum x world rows, so no row is lost or repeated at an epoch boundary: a step that
    reaches the end of one epoch takes the rest of its rows from the next. Every step is full, so every
    process does the same work and the same collectives. Step s of a resumed run sees exactly the rows
    step s of the uninterrupted run saw.
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
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps one pass over the rows takes (a fraction when the last step spills over)."""
        return self.n_examples / self.rows_per_step

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = self._permutation(epoch)
        return self._cache[epoch]

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_examples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n_examples, generator=g).tolist()
        if self.lengths is None:
            return perm
        return group_by_length(perm, self.lengths, self.rows_per_step, g)

    def step_rows(self, step: int) -> list[int]:
        """The `rows_per_step` example indices of global step `step`, over all processes."""
        start = step * self.rows_per_step
        rows = []
        while len(rows) < self.rows_per_step:
            epoch, offset = divmod(start + len(rows), self.n_examples)
            need = self.rows_per_step - len(rows)
            rows += self.permutation(epoch)[offset : offset + need]
        return rows

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's `grad_accum` micro-batches (lists of example indices) for global step `step`."""
        return self.rank_micro_batches(step, self.rank)

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Process `rank`'s micro-batches for step `step`: micro-batch m of every process is a slice of
        rows [m·bs·world, (m+1)·bs·world), so the rows of a step do not depend on how it is split."""
        rows = self.step_rows(step)
        per_micro = self.batch_size * self.world
        return [
            rows[m * per_micro + rank * self.batch_size : m * per_micro + (rank + 1) * self.batch_size]
            for m in range(self.grad_accum)
        ]


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
    """Indices of the training examples the run's steps will visit on any process (all of them once the
    run covers an epoch; fewer when max_steps stops early), so one-off passes skip rows never trained on.
    The same list on every process."""
    order = data_order(cfg, n_examples, accelerator)
    steps = total_steps(cfg, order)
    if steps * order.rows_per_step >= n_examples:
        return list(range(n_examples))
    return sorted({i for s in range(steps) for i in order.step_rows(s)})


def total_steps(cfg: TrainConfig, order: DataOrder) -> int:
    """max_steps, or enough steps for `epochs` passes over the rows (the last one topped up)."""
    if order.n_examples < order.rows_per_step:
        raise ValueError(
            f"{order.n_examples} training examples are fewer than one optimizer step needs "
            f"(batch_size x grad_accum x processes = {order.rows_per_step}); lower batch_size"
        )
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * order.steps_per_epoch - 1e-9))


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
    """Appends one JSON object per line to output_dir/metrics.jsonl (main process only), and sends the same
    numbers to the run's `report_to` tracker (`tracking.log_record`) when start_run started one."""

    def __init__(self, output_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            # Drop lines from steps after the checkpoint: the resumed run writes them again. A line torn by
            # a kill mid-write, or otherwise unreadable, is dropped too, and said.
            found = read_jsonl(self.path)
            for note in found.skipped():
                print(note)
            kept = [r for r in found.records if r.get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif enabled:
            atomic_write(self.path, "")

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log_record(self.path.parent, record)


def _as_tensor(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value), device=device)


def optimizer_step(
    accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    micro_batches: list[dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    *,
    units: list[float] | None = None,
    max_grad_norm: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One optimizer step over this process's micro-batches; returns the step's metrics.

    model: the prepared (accelerate-wrapped) model, which `loss_fn(model, batch)` must call so that the
    wrapper's hooks run; it returns the batch's loss, a mean over its `units`, and {name: value} metrics,
    each a mean over the same units. units[m] counts what micro-batch m's mean is over: rows for a
    sequence-mean loss (the default: 1 per micro-batch, i.e. equal weights), completion tokens for a
    token-mean one. Each loss is scaled by W·units[m] / (units of the whole step on all W processes), so
    that, with DDP averaging gradients over processes, the gradient is that of the mean over every unit of
    the step, however it is split into micro-batches and processes (OpenRLHF's and DAPO's aggregation).
    Gradients are synchronised on the last micro-batch only (`no_sync` before it).

    Returns 0-dim tensors: every metric as its unit-weighted mean over the step on all processes (one
    collective for all of them), `grad_norm` (before clipping) and `lr` (of the step just taken); the
    caller turns them into numbers once.
    """
    if len(micro_batches) > 1 and accelerator.distributed_type.name == "DEEPSPEED":
        raise ValueError(
            "under DeepSpeed, accelerate steps the optimizer after every backward: set grad_accum=1 "
            "(and DeepSpeed's gradient_accumulation_steps=1; docs/distributed.md)"
        )
    device = accelerator.device
    units = [1.0] * len(micro_batches) if units is None else [float(u) for u in units]
    local_units = torch.tensor(sum(units), dtype=torch.float64, device=device)
    step_units = (
        accelerator.reduce(local_units, "sum").item() if accelerator.num_processes > 1 else sum(units)
    )
    world = accelerator.num_processes
    sums: dict[str, torch.Tensor] = {}
    for m, (batch, n) in enumerate(zip(micro_batches, units)):
        last = m == len(micro_batches) - 1
        ctx = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with ctx, accelerator.autocast():
            loss, metrics = loss_fn(model, batch)
            accelerator.backward(loss * (world * n / max(step_units, 1e-12)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + _as_tensor(v, device) * n
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        grads = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
        grad_norm = torch.stack(grads).sum().sqrt() if grads else torch.zeros((), device=device)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    names = list(sums)
    totals = torch.stack([sums[k].to(device) for k in names]) if names else torch.zeros(0, device=device)
    if world > 1:
        totals = accelerator.reduce(totals, "sum")
    means = totals / max(step_units, 1e-12)
    out = {k: means[i] for i, k in enumerate(names)}
    out["grad_norm"] = torch.as_tensor(grad_norm).detach().float().reshape(())
    out["lr"] = torch.tensor(lr)
    return out


def as_numbers(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors -> floats, in one device-to-host copy."""
    names = list(metrics)
    if not names:
        return {}
    values = torch.stack([torch.as_tensor(metrics[k]).float().cpu().reshape(()) for k in names]).tolist()
    return dict(zip(names, values))


def gather_rows(accelerator, x: torch.Tensor) -> torch.Tensor:
    """`x`'s rows from every process, concatenated in rank order (the first dimension may differ between
    processes), on `x`'s device and in its dtype; `x` itself on one process. Every process gets the same
    tensor, so statistics taken over it are the whole step's and equal on every process.

    (n, ...) on process r -> (Σ_r n_r, ...)."""
    if accelerator.num_processes == 1:
        return x
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([x.shape[0]], device=device)).tolist()
    values = x.to(device, torch.float64 if x.is_floating_point() else torch.long)  # (bool cannot be sent)
    padded = accelerator.gather(accelerator.pad_across_processes(values, dim=0))  # (W·max n, ...)
    most = max(counts)
    rows = [padded[r * most : r * most + n] for r, n in enumerate(counts)]
    return torch.cat(rows).to(x.device, x.dtype)


def gather_objects(accelerator, obj) -> list:
    """[`obj` of process 0, of process 1, ...]: a picklable object from every process, in rank order, on
    every process (`[obj]` on one process). For what is not a tensor of rows: counters whose keys differ
    between processes, pair statistics."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


class Interrupts:
    """Ctrl-C in a training loop never saves a half step: it finishes the step or drops it.

    Inside `with Interrupts(accelerator) as interrupts:` the first SIGINT only asks to stop: the loop
    finishes the step it is in, and at the step's end (`stop_requested`, on every process) saves that
    step's checkpoint and exits 130 (`stop`). A second Ctrl-C more than `REPEAT_S` later raises
    KeyboardInterrupt: the loop drops the step it is in, saves nothing (`drop`) and the last checkpoint
    stays the last whole step. A repeat within `REPEAT_S` is the same Ctrl-C: `torchrun` and `accelerate
    launch` forward the terminal's SIGINT to workers that already received it. Outside the main thread
    no handler can be installed and every Ctrl-C drops the step.
    """

    REPEAT_S = 1.0

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self._asked_at: float | None = None
        self._previous = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        now = time.monotonic()
        if self._asked_at is None:
            self._asked_at = now
            if self.accelerator.is_main_process:
                print(
                    "\nCtrl-C: finishing this step, then saving it (Ctrl-C again to stop now, dropping it)",
                    file=sys.stderr,
                    flush=True,
                )
        elif now - self._asked_at > self.REPEAT_S:
            raise KeyboardInterrupt

    def stop_requested(self) -> bool:
        """Whether Ctrl-C reached any process; every process calls it at the same step's end (one
        all-reduce with several processes), so all of them stop after the same step."""
        asked = torch.tensor(float(self._asked_at is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            asked = self.accelerator.reduce(asked, "sum")
        return bool(asked > 0)

    def stop(self, path: Path | None, step: int):
        """After `stop_requested`: say where step `step` was saved (`path`, on the main process) and exit 130."""
        if path is not None:
            print(f"\ninterrupted after step {step}: checkpoint written to {path}; continue with resume=true")
        raise SystemExit(130)

    def drop(self, step: int, latest: Path | None):
        """On KeyboardInterrupt: step `step` + 1 is dropped unsaved; say which checkpoint a resume starts
        from (`latest`) and exit 130."""
        if self.accelerator.is_main_process:
            since = f"from {latest}" if latest is not None else "from the start (no checkpoint yet)"
            print(
                f"\ninterrupted: step {step + 1} dropped unfinished, nothing saved; resume=true continues {since}"
            )
        raise SystemExit(130)


def fit(
    cfg: TrainConfig,
    accelerator,
    model: torch.nn.Module,
    train_examples: list[dict],
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    *,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    units: Callable[[list[dict]], float] | None = None,
    setup_metrics: dict | None = None,
    state=None,
    lengths: list[int] | None = None,
    summarise: Callable[[dict], dict] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Run the optimisation loop; returns (the prepared model, the last logged train metrics).

    model: the module every loss calls (an `alignkit.models.load.BatchForward`), prepared here with its
    optimizer; loss_fn(prepared model, batch) returns the micro-batch loss and metrics (see
    `optimizer_step`). units(examples) counts what a micro-batch's loss is a mean over (default: its
    rows; SFT's token-mean loss counts completion tokens). evaluate(prepared model) returns eval metrics.
    setup_metrics (e.g. the seconds a one-off reference pass took) are added to the first logged record.
    state, an object with state_dict() / load_state_dict() (e.g. a loss's running statistics), is saved in
    every checkpoint as it was at the end of that step and restored on resume, so a resumed run repeats
    the uninterrupted one exactly. lengths (one per training example) makes every step draw rows of
    similar length (`group_by_length`). summarise(record) derives the logged metrics from a step's
    averaged ones (e.g. a class's mean reward from the mean of reward x indicator and the class's share).
    """
    output_dir = Path(cfg.output_dir)
    order = data_order(cfg, len(train_examples), accelerator, lengths)
    steps = total_steps(cfg, order)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(output_dir, cfg.save_total_limit)

    def named(loop_state=None) -> dict:
        out = {"model": accelerator.unwrap_model(model), "optimizer": optimizer, "scheduler": scheduler}
        if state is not None:
            out["loop_state"] = loop_state if loop_state is not None else state
        return out

    start = 0
    latest = checkpointer.latest() if cfg.resume else None
    if cfg.resume and latest is None and accelerator.is_main_process:
        print(f"resume=true but no checkpoint in {checkpointer.root}; starting from step 0")
    if latest is not None:
        start = checkpointer.load(latest, named(), defaults=default_fingerprint(cfg))["step"]
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

    def save() -> Path | None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        return checkpointer.save(step, named(Frozen(snapshot) if state is not None else None))

    with Interrupts(accelerator) as interrupts:
        try:
            while step < steps:
                model.train()
                t0 = time.perf_counter()
                micro = [[train_examples[i] for i in idx] for idx in order.micro_batches(step)]
                batches = [{k: v.to(accelerator.device) for k, v in collate(mb).items()} for mb in micro]
                tokens = sum(b["attention_mask"].sum() for b in batches)
                record = optimizer_step(
                    accelerator,
                    model,
                    optimizer,
                    scheduler,
                    batches,
                    loss_fn,
                    units=[units(mb) if units else len(mb) for mb in micro],
                    max_grad_norm=cfg.max_grad_norm,
                )
                record["tokens"] = (
                    accelerator.reduce(tokens.float(), "sum") if accelerator.num_processes > 1 else tokens
                )
                record = as_numbers(record)  # the step's one host sync
                step += 1
                if state is not None:
                    snapshot = state.state_dict()
                elapsed = time.perf_counter() - t0
                if summarise is not None:
                    record = summarise(record)
                record.update(step_time=elapsed, **{"tokens/s": record["tokens"] / elapsed})
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
                        logger.log({"step": step, "split": "eval", **evaluate(model)})
                saved = cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < steps
                path = save() if saved else None
                if step < steps and interrupts.stop_requested():  # Ctrl-C: this step is whole, stop here
                    bar.close()
                    interrupts.stop(path if saved else save(), step)
        except KeyboardInterrupt:
            bar.close()
            interrupts.drop(step, checkpointer.latest())
    bar.close()
    return model, last


def evaluate_in_batches(
    model, examples: list[dict], batch_size: int, collate: Callable, loss_fn: Callable, device
) -> dict:
    """Every metric of `loss_fn(model, batch)` over `examples`, in batches, each batch weighted by its rows."""
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        _, metrics = loss_fn(model, batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + _as_tensor(v, device) * len(chunk)
    return {k: v / len(examples) for k, v in as_numbers(totals).items()}


def save_final(accelerator, model, tokenizer, output_dir: Path, merge_lora: bool, log=print) -> Path:
    """Save the trained model (save_pretrained, safetensors) to output_dir/final on the main process, then
    end the run (`finish_run`: trackers closed, report written). Every training command ends here.

    model: the prepared module `fit` returned (a BatchForward around the model) or the model itself."""
    from alignkit.models.load import BatchForward, save_model

    final = Path(output_dir) / "final"
    accelerator.wait_for_everyone()
    state_dict = None
    if sharded(accelerator):  # FSDP / ZeRO-3: the full weights, gathered on every process (untested here)
        state_dict = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        inner = inner.model if isinstance(inner, BatchForward) else inner
        save_model(inner, tokenizer, final, merge_lora=merge_lora, state_dict=state_dict)
        log(f"final model saved to {final}")
    accelerator.wait_for_everyone()
    finish_run(accelerator, output_dir, log)
    return final


def finish_run(accelerator, output_dir: Path, log=print) -> None:
    """Close the run's trackers and, on the main process, write output_dir/report.html unless the run's
    saved config says report=false. A report that fails warns and returns: the saved run is never lost."""
    finish_trackers(accelerator)
    if accelerator.is_main_process:
        from alignkit.report.build import report_after_run

        report_after_run(output_dir, log)


def sharded(accelerator) -> bool:
    """Whether parameters are sharded over processes (FSDP or DeepSpeed), so the main process alone
    does not hold them."""
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
