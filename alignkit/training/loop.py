"""The run loop's bookkeeping: the metrics log, Ctrl-C between steps, and `fit`, the loop every offline objective
(SFT, the DPO family, reward models) runs.

The algorithm supplies `loss_fn(model, batch) -> (loss, metrics)`, called with the *prepared* model, and the
data; `fit` owns data order, logging, evaluation, checkpoints (`training.checkpoint`), resume and Ctrl-C.
Distributed runs (`torchrun`, `accelerate launch`) are one run over N processes: every process draws its own
share of each step (`training.order.DataOrder`), the loss of a step is the mean over the rows (or tokens) of
all processes, and only the main process writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.config.base import TrainConfig
from alignkit.config.online import OnlineConfig
from alignkit.data.prompts import Prompts
from alignkit.generation.backends import ModelSampler, Sampler
from alignkit.generation.guided import GuidedSampler, TracesSampler
from alignkit.io import atomic_write, read_jsonl
from alignkit.rewards import RewardSet
from alignkit.rollout import Rollout, collect
from alignkit.training.alarm_figures import step_figures
from alignkit.training.alarms import Alarms, AlarmStop, describe
from alignkit.training.checkpoint import Checkpointer, Frozen, default_fingerprint
from alignkit.training.order import DataOrder, data_order, total_steps
from alignkit.training.setup import finish_run, gather_objects, gather_rows
from alignkit.training.step import as_numbers, make_optimizer, optimizer_step
from alignkit.training.tracking import log_record


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


class RunInterrupted(KeyboardInterrupt):
    """A training loop stopped by Ctrl-C, after saving its last whole step (`step`; `checkpoint`, the folder
    it is in, None where nothing could be saved), or after dropping the step it was in (`dropped`). A
    KeyboardInterrupt, so a notebook's `alignkit.train(...)` stops as Ctrl-C always stops Python code; the
    CLI turns it into exit status 130. Continue with resume=true."""

    def __init__(self, step: int, checkpoint: Path | None, *, dropped: bool):
        super().__init__(f"interrupted after step {step}" + (" (the next one dropped)" if dropped else ""))
        self.step, self.checkpoint, self.dropped = step, checkpoint, dropped


class Interrupts:
    """Ctrl-C in a training loop never saves a half step: it finishes the step or drops it.

    Inside `with Interrupts(accelerator) as interrupts:` the first SIGINT only asks to stop: the loop
    finishes the step it is in, and at the step's end (`stop_requested`, on every process) saves that
    step's checkpoint and raises `RunInterrupted` (`stop`). A second Ctrl-C more than `REPEAT_S` later raises
    KeyboardInterrupt: the loop drops the step it is in, saves nothing (`drop`, which raises
    `RunInterrupted` too) and the last checkpoint stays the last whole step. A repeat within `REPEAT_S` is the same Ctrl-C: `torchrun` and `accelerate
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
        """After `stop_requested`: say where step `step` was saved (`path`, on the main process) and raise
        `RunInterrupted`."""
        if path is not None:
            print(f"\ninterrupted after step {step}: checkpoint written to {path}; continue with resume=true")
        raise RunInterrupted(step, path, dropped=False)

    def drop(self, step: int, latest: Path | None):
        """On KeyboardInterrupt: step `step` + 1 is dropped unsaved; say which checkpoint a resume starts
        from (`latest`) and raise `RunInterrupted`."""
        if self.accelerator.is_main_process:
            since = f"from {latest}" if latest is not None else "from the start (no checkpoint yet)"
            print(
                f"\ninterrupted: step {step + 1} dropped unfinished, nothing saved; resume=true continues {since}"
            )
        raise RunInterrupted(step, latest, dropped=True)


class Run:
    """The one run loop's bookkeeping, around an algorithm's own step: the number of steps (`order` and
    `total_steps`), resuming from the newest checkpoint, metrics lines, eval and checkpoint intervals, the
    progress bar, and Ctrl-C (`Interrupts`: a step is finished and saved, or dropped; never saved half done).
    `fit` (every offline objective) and `OnlineRun` (every online command) run it:

        run = Run(cfg, accelerator, order, named=named)
        ...                                     # prepare the model and optimizer
        run.resume()
        with run.interruptible():
            while run.step < run.steps:
                ...                             # the step: one optimizer step, or a rollout and its updates
                run.finish_step(record, evaluate)

    `named()` returns the named state a checkpoint holds (models, optimizer, scheduler, loop state, ...); it
    is restored by `resume` when `cfg.resume` finds a checkpoint. `log` prints on the main process.
    """

    def __init__(
        self, cfg: TrainConfig, accelerator, order: DataOrder, *, named: Callable[[], dict], log=None
    ):
        self.cfg, self.accelerator, self.order, self.named = cfg, accelerator, order, named
        self.log = log or (print if accelerator.is_main_process else (lambda *a, **k: None))
        self.steps = total_steps(cfg, order)
        self.checkpointer = Checkpointer(Path(cfg.output_dir), cfg.save_total_limit)
        self.step = 0
        self.start = 0
        """The step the run started (or resumed) at."""
        self.last: dict = {}
        """The last logged train record."""
        self.logger: MetricsLogger | None = None

    def resume(self) -> None:
        """Restore the newest checkpoint's state when `cfg.resume` (after the optimizer is prepared), and
        open the metrics log (dropping the lines of steps after the checkpoint)."""
        latest = self.checkpointer.latest() if self.cfg.resume else None
        if self.cfg.resume and latest is None:
            self.log(f"resume=true but no checkpoint in {self.checkpointer.root}; starting from step 0")
        if latest is not None:
            defaults = default_fingerprint(self.cfg)
            self.step = self.start = self.checkpointer.load(latest, self.named(), defaults=defaults)["step"]
            self.log(f"resumed from {latest} at step {self.step}")
        resumed = self.step if latest is not None else None
        self.logger = MetricsLogger(Path(self.cfg.output_dir), self.accelerator.is_main_process, resumed)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """`x`'s rows from every process in rank order (`training.setup.gather_rows`): what batch statistics,
        the reward normaliser and logged figures must see."""
        return gather_rows(self.accelerator, x)

    def gather_objects(self, obj) -> list:
        """`obj` of every process, in rank order (`training.setup.gather_objects`): counters and statistics that
        are not rows of a tensor, for the logged figures."""
        return gather_objects(self.accelerator, obj)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (main process); returns its folder or None."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        return self.checkpointer.save(self.step, self.named())

    def finish_step(
        self,
        record: dict,
        evaluate: Callable[[], dict] | None = None,
        postfix: dict | None = None,
        *,
        log_always: bool = False,
    ) -> bool:
        """Count the step done; log its record (every step with `log_always`), evaluate (`evaluate() -> dict`)
        and checkpoint when the intervals say so; on Ctrl-C, save this whole step and stop. `postfix`: the
        progress bar's figures (numbers, or text already formatted). Returns whether the step was saved."""
        cfg = self.cfg
        self.step += 1
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix({k: v if isinstance(v, str) else f"{v:.3f}" for k, v in postfix.items()})
        if self.step % cfg.logging_steps == 0 or self.step == self.steps or log_always:
            self.last = {"step": self.step, "split": "train", **record}
            self.logger.log(self.last)
        if evaluate is not None and (self.step % cfg.eval_steps == 0 or self.step == self.steps):
            self.logger.log({"step": self.step, "split": "eval", **evaluate()})
        saved = cfg.save_steps > 0 and self.step % cfg.save_steps == 0 and self.step < self.steps
        path = self.save() if saved else None
        if self.step < self.steps and self._interrupts.stop_requested():  # Ctrl-C: this step is whole
            self._bar.close()
            self._interrupts.stop(path if saved else self.save(), self.step)
        return saved

    @contextlib.contextmanager
    def interruptible(self):
        """The loop's body runs inside: a progress bar, and Ctrl-C handled by `Interrupts`: the first finishes
        the step, saves it and raises `RunInterrupted`; a second drops the step unsaved and raises it too
        (the CLI exits 130; continue with resume=true)."""
        from tqdm.auto import tqdm

        show = self.cfg.progress and self.accelerator.is_main_process
        self._bar = tqdm(total=self.steps, initial=self.step, disable=not show, dynamic_ncols=True)
        with Interrupts(self.accelerator) as self._interrupts:
            try:
                yield self
            except RunInterrupted:
                raise
            except KeyboardInterrupt:
                self._bar.close()
                self._interrupts.drop(self.step, self.checkpointer.latest())
        self._bar.close()


def fit(
    cfg: TrainConfig,
    accelerator,
    model: torch.nn.Module,
    train_examples: list[dict],
    *,
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    units: Callable[[list[dict]], float] | None = None,
    setup_metrics: dict | None = None,
    state=None,
    lengths: list[int] | None = None,
    summarise: Callable[[dict], dict] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Run the optimisation loop (`Run`); returns (the prepared model, the last logged train metrics).

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
    order = data_order(cfg, len(train_examples), accelerator, lengths)
    optimizer, scheduler = make_optimizer(model, cfg, total_steps(cfg, order))
    model, optimizer = accelerator.prepare(model, optimizer)
    snapshot = None  # the loop state as at the end of step `run.step`

    def named() -> dict:
        out = {"model": accelerator.unwrap_model(model), "optimizer": optimizer, "scheduler": scheduler}
        if state is not None:  # restored into `state`; saved as it was at the step's end
            out["loop_state"] = Frozen(snapshot) if snapshot is not None else state
        return out

    run = Run(cfg, accelerator, order, named=named)
    run.resume()
    snapshot = state.state_dict() if state is not None else None

    def evaluated() -> dict:
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            return evaluate(model)

    with run.interruptible():
        while run.step < run.steps:
            t0 = time.perf_counter()
            micro = [[train_examples[i] for i in idx] for idx in order.micro_batches(run.step)]
            record = fit_step(
                cfg,
                accelerator,
                model,
                micro,
                optimizer=optimizer,
                scheduler=scheduler,
                collate=collate,
                loss_fn=loss_fn,
                units=units,
            )
            if state is not None:
                snapshot = state.state_dict()
            elapsed = time.perf_counter() - t0
            if summarise is not None:
                record = summarise(record)
            record.update(step_time=elapsed, **{"tokens/s": record["tokens"] / elapsed})
            if run.step == run.start and setup_metrics:
                record.update(setup_metrics)
            postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens/s']:.0f}"}
            run.finish_step(record, evaluated if evaluate is not None else None, postfix)
    return model, run.last


def fit_step(
    cfg: TrainConfig,
    accelerator,
    model,
    micro: list[list[dict]],
    *,
    optimizer,
    scheduler,
    collate,
    loss_fn,
    units,
) -> dict:
    """One optimizer step of `fit` over this process's micro-batches of examples (`micro`); returns its
    record as numbers (the step's one host sync), with the tokens of every process."""
    model.train()
    batches = [{k: v.to(accelerator.device) for k, v in collate(mb).items()} for mb in micro]
    tokens = sum(b["attention_mask"].sum() for b in batches)
    record = optimizer_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        micro_batches=batches,
        loss_fn=loss_fn,
        units=[units(mb) if units else len(mb) for mb in micro],
        max_grad_norm=cfg.max_grad_norm,
    )
    record["tokens"] = accelerator.reduce(tokens.float(), "sum") if accelerator.num_processes > 1 else tokens
    return as_numbers(record)


class OnlineRun(Run):
    """The run loop of every online command: `Run` over the prompt rows (`batch_size` prompts a step), plus
    which prompts and sampling seed a step uses (functions of the seed and step, so a resume redraws them)
    and the step's rollout.

        run = OnlineRun(cfg, accelerator, len(prompts.train_rows), named=named, log=log)
        ...
        with run.interruptible():
            while run.step < run.steps:
                rollout, seed = run.collect(policy, tokenizer, prompts, rewards, sampling, group_size=G)
                ...                                     # advantages, updates
                run.finish_step(record, evaluate, rollout=rollout)    # + the alarms
    """

    def __init__(
        self,
        cfg: OnlineConfig,
        accelerator,
        n_prompts: int,
        *,
        named: Callable[[], dict],
        log=None,
        sampler: Sampler | None = None,
        guided: GuidedSampler | TracesSampler | None = None,
        extra_draws: int = 0,
    ):
        order = DataOrder(
            n_prompts,
            cfg.batch_size,
            1,
            cfg.seed,
            accelerator.num_processes,
            accelerator.process_index,
            cfg.shuffle,
        )
        super().__init__(cfg, accelerator, order, named=named, log=log)
        self.extra_draws = extra_draws
        """The most extra draws of prompts a step may make (dynamic sampling; 0: none)."""
        self.refill_order = dataclasses.replace(order, seed=cfg.seed + 1, _cache={})
        """Where a step's extra draws take their prompts: a second seeded order (another permutation of
        the prompts each epoch), cut into `extra_draws` draws a step, so that draw d of step s is the same
        prompts in a resumed run and no two draws of a run overlap in it."""
        self.sampler = sampler or ModelSampler(cfg.generation.backend)
        """What draws the rollouts (`rollout.run_sampler`; default: the policy itself, on its backend) and the
        evaluations."""
        self.guided = guided
        """With a guide (`generation.guided`): what draws the rollouts instead, the policy mixed with the guide at
        the step's α (`GuidedSampler`), or the run's sampler beside the step's k guide traces (`TracesSampler`);
        evaluations stay the policy's own."""
        settings = getattr(cfg, "alarms", None)
        self.alarms = Alarms(settings) if settings is not None and settings.enabled else None
        """The reward-hacking and collapse alarms (`training.alarms`), checkpointed with the run; None when off."""
        self.source_signs: dict[str, float] = {}
        """The sign of every reward source's weight (what the alarms sign the sources' means by)."""
        if self.alarms is not None:
            self.named = lambda: {**named(), "alarms": self.alarms}

    def finish_step(
        self,
        record: dict,
        evaluate: Callable[[], dict] | None = None,
        postfix: dict | None = None,
        *,
        rollout: Rollout | None = None,
        reference: bool = True,
        returns: torch.Tensor | None = None,
    ) -> bool:
        """`Run.finish_step`, after the alarms (`training.alarms`, with `alarms.enabled`) have read the step's
        `rollout` and `record` (`reference`: the rollout's ref_logps cover every completion, so its KL is
        taken; `returns`, (N,): what the update maximises per completion where it is not the reward, the reward
        less β·KL): their verdicts join the record, a step where one fires is always logged and its onset
        printed, and with `alarms.stop_on_alarm` the run stops after it (checkpointed, report written,
        `AlarmStop` raised). Every process decides the same: every figure is over all of them."""
        fired = {}
        if self.alarms is not None and rollout is not None:
            figures = step_figures(
                rollout,
                record,
                gather=self.gather,
                source_signs=self.source_signs,
                reference=reference,
                repeat_ngram=self.alarms.settings.repeat_ngram,
                returns=returns,
            )
            check = self.alarms.update(figures)
            record, fired = {**record, **check.record}, check.fired
            for name in check.onsets:
                self.log(f"\nalarm at step {self.step + 1}: {name}: {fired[name]} ({describe(name)})")
        saved = super().finish_step(record, evaluate, postfix, log_always=bool(fired))
        if fired and self.alarms.settings.stop_on_alarm:
            path = self.save() if not saved else self.checkpointer.root / f"checkpoint-{self.step}"
            self._bar.close()
            finish_run(self.accelerator, Path(self.cfg.output_dir), self.log)  # the report marks the alarm
            raise AlarmStop(self.step, fired, path if self.accelerator.is_main_process else None)
        return saved

    def synced(self, policy) -> Sampler:
        """The run's sampler, following `policy`'s (the unwrapped model's) current weights: they are synced
        into it once per step (`Sampler.sync`, versioned by the step count, which the updates of a step
        change; the evaluation after a step and the next step's rollout share one sync)."""
        self.sampler.sync(policy, self.step)
        return self.sampler

    def step_prompts(self, draw: int = 0) -> tuple[list[int], int]:
        """(prompt indices, sampling seed) of this process for the current step; `draw` d >= 1: the step's
        d-th extra draw (`extra_draws`), batch_size prompts of `refill_order`, with a seed of its own."""
        seed = ((self.cfg.seed + draw) * 1_000_003 + self.step) * 1009 + self.accelerator.process_index
        if draw == 0:
            return self.order.micro_batches(self.step)[0], seed
        if not 1 <= draw <= self.extra_draws:
            raise ValueError(f"draw {draw} of a step: this run makes at most {self.extra_draws} extra draws")
        return self.refill_order.micro_batches(self.step * self.extra_draws + draw - 1)[0], seed

    def collect(
        self,
        policy,
        tokenizer,
        prompts: Prompts,
        rewards: RewardSet,
        *,
        sampling,
        group_size: int,
        draw: int = 0,
    ):
        """(rollout, seed): this process's rollout of the current step, `group_size` completions of each
        of its prompts from `policy` (the unwrapped model), sampled with the step's seed by the run's
        sampler, synced to `policy` first (with a guide, by the guided sampler set for the step). `draw`
        d >= 1: the step's d-th extra draw of prompts instead (`step_prompts`)."""
        idx, seed = self.step_prompts(draw)
        self.source_signs = {k: 1.0 if w >= 0 else -1.0 for k, w in getattr(rewards, "weights", {}).items()}
        sampler = self.synced(policy)
        if self.guided is not None:
            sampler = self.guided.for_step(self.cfg.guide, self.step, self.steps, sampler)
        rollout = collect(
            policy,
            tokenizer,
            [prompts.train_ids[i] for i in idx],
            [prompts.train_rows[i].reward_input for i in idx],
            rewards=rewards,
            group_size=group_size,
            sampling=sampling,
            seed=seed,
            gather=self.gather,
            sampler=sampler,
            columns=[prompts.train_rows[i].columns for i in idx],  # what the reward sources may read
            origins=[prompts.train_rows[i].origin for i in idx],
            step=self.step,
            max_steps=self.steps,
        )
        return rollout, seed
