"""Online GRPO throughput, memory and reward: `alignkit grpo` vs TRL's GRPOTrainer, same model and settings.

    pip install -e ".[bench]"                # trl, benchmark-only
    python benchmarks/grpo_vs_trl.py         # CPU; prints a table, both reward curves and one JSON line
    python benchmarks/grpo_vs_trl.py --record    # waits for a quiet machine, then appends to RESULTS.md

The setting: the shipped TinyStories-656K model (alignkit/assets/tinystories-656k), the "prompt" field of
alignkit/assets/demo/pairs.jsonl in file order (365 prompts; 20 steps x 8 use the first 160, no prompt
twice), reward = VADER compound sentiment of the completion, fp32 on CPU, no vLLM. Each side runs in its
own process (`alignkit grpo ...` through `python -m alignkit.cli`, TRL through this file's `--side trl`)
so its peak RSS (from wait4) and wall time (process start to exit, imports and model loading included)
are its own; the training loop is the sum of the per-step times (rollout + update) each side reports.

Settings, and how each library spells them (one step = one rollout = one optimizer step):

    setting                  alignkit grpo                         TRL GRPOConfig
    prompts per step         batch_size=8                          generation_batch_size = 64 completions
                                                                   = per_device_train_batch_size 64
                                                                     x steps_per_generation 1 (8 prompts x G)
    G                        num_generations=8                     num_generations=8
    one update per rollout   minibatch_size=0 (whole rollout),     gradient_accumulation_steps=1,
                             ppo_epochs=1, grad_accum=1            steps_per_generation=1, num_iterations=1
    completion length        generation.max_new_tokens=48          max_completion_length=48
    sampling                 generation.temperature=1              temperature=1 top_k=0 top_p=1 min_p=None
                             generation.top_k=0 .top_p=1
                                                                   repetition_penalty=1
    KL to the reference      beta=0.04 kl_estimator=k3             beta=0.04 (k3 is TRL's only estimator),
                             kl_importance_correction=false        use_bias_correction_kl=False (default True)
    clip                     epsilon=0.2                           epsilon=0.2
    advantage                advantage=grpo scale_rewards=group    scale_rewards="group" (both: std + 1e-4)
    loss aggregation         loss_aggregation=sequence_mean        loss_type="grpo"  (--aggregation token_mean:
                                                                   token_mean <-> "dapo"; with one micro-batch
                                                                   per step each pair is the same formula)
    optimizer                AdamW, lr=1e-4, weight_decay 0,       optim="adamw_torch", learning_rate=1e-4,
                             lr_scheduler=constant warmup_ratio=0  lr_scheduler_type="constant" warmup_steps=0
    gradient clipping        max_grad_norm=1.0                     max_grad_norm=1.0
    precision                dtype=float32 mixed_precision=no      bf16=False fp16=False (TRL defaults to bf16),
                                                                   model_init_kwargs dtype float32, use_cpu
    dropout                  always off                            disable_dropout=True
    activations              gradient_checkpointing=false          gradient_checkpointing=False (default True)
    prompt order             shuffle=false                         shuffle_dataset=False
    truncated completions    mask_truncated=false (in the loss)    mask_truncated_completions=False
    seed                     seed=42                               seed=42
    at the end               the final model is saved              trainer.save_model() (both write one)

What is not the same: the random draws (each library seeds its own sampler, so the two reward curves are
two samples of the same process, not the same completions), and the work each library chooses to do.
TRL samples with transformers' `generate`; alignkit with its own decode loop on the KV cache
(`generation.sample_ids`: each prompt encoded once for its G samples, one uniform per row per token;
benchmarks/generation_speed.py times it against `generate` in one process). With one update per rollout
both take the sampling policy's log-probs from the training forward (detached), so `time/logprobs` is the
reference's pass. Both log the entropy of every completion token, computed in the training forward.

Reward curves come from alignkit's output_dir/metrics.jsonl (`reward` on each train line) and from TRL's
log history (`reward` with logging_steps=1). Per-step time splits: alignkit logs time/generation,
time/scoring (decode + reward), time/logprobs and time/training; for TRL this file times the same
pieces by wrapping GRPOTrainer's generation, reward and no-grad log-prob methods, and its training is
the rest of the step.

--record waits (polling every 30 s, up to --max-wait s) for the 1-minute load average to fall below
--quiet-load before each side, and appends (or, for the same date and command, replaces) a section in
benchmarks/RESULTS.md with the command, date, machine, load averages, versions and the numbers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Relative to the repository root, where both sides run.
MODEL = Path("alignkit/assets/tinystories-656k")
PROMPTS = Path("alignkit/assets/demo/pairs.jsonl")
SIDES = ("trl", "alignkit")
TRL_AGGREGATION = {"sequence_mean": "grpo", "token_mean": "dapo"}
MIN_TRL = "1.16"


# --- the machine -----------------------------------------------------------------------------------------


def require_trl() -> str:
    """trl's version, or a SystemExit that says how to install it."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            'grpo_vs_trl: trl is not installed. Install the benchmark extra: pip install -e ".[bench]"'
        ) from None
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < tuple(int(x) for x in MIN_TRL.split(".")):
        raise SystemExit(
            f"grpo_vs_trl: trl {version} is older than {MIN_TRL}, whose GRPOConfig this file maps settings to; "
            'run pip install -e ".[bench]"'
        )
    return version


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform's best guess)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def versions() -> dict:
    """Versions of both libraries and what they run on; alignkit's git commit, and whether alignkit/ has
    uncommitted changes."""
    out = {}
    for package in ("alignkit", "trl", "torch", "transformers", "accelerate", "vaderSentiment"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    edited = git("status", "--porcelain", "--", "alignkit")  # the library measured, not this file
    out["alignkit_commit"] = (commit + (" + uncommitted changes in alignkit/" if edited else "")) or None
    return out


def wait_for_quiet(threshold: float, max_wait: float, poll: float = 30.0) -> dict:
    """Poll the 1-minute load average until it is below `threshold` or `max_wait` seconds have passed;
    returns the load it started at, the load it ended at and whether the machine got quiet."""
    start, first = time.monotonic(), os.getloadavg()[0]
    load = first
    while load >= threshold and time.monotonic() - start < max_wait:
        print(
            f"  load average {load:.2f} >= {threshold}: waiting {poll:.0f} s for a quiet machine", flush=True
        )
        time.sleep(poll)
        load = os.getloadavg()[0]
    return {
        "load_first": first,
        "load": load,
        "quiet": load < threshold,
        "waited_s": time.monotonic() - start,
    }


# --- one side in its own process -------------------------------------------------------------------------


def alignkit_argv(args, out: Path) -> list[str]:
    """The `alignkit grpo` command line of the benchmark's setting."""
    return [
        "grpo",
        f"model={MODEL}",
        f"data={PROMPTS}",
        "rewards=[{type: vader}]",
        f"output_dir={out}",
        f"max_steps={args.steps}",
        f"batch_size={args.prompts}",
        f"num_generations={args.generations}",
        f"generation.max_new_tokens={args.max_new_tokens}",
        "generation.temperature=1.0",
        "generation.top_k=0",
        "generation.top_p=1.0",
        f"lr={args.lr}",
        "lr_scheduler=constant",
        "warmup_ratio=0",
        "weight_decay=0",
        "max_grad_norm=1.0",
        f"beta={args.beta}",
        "kl_estimator=k3",
        "kl_importance_correction=false",
        "epsilon=0.2",
        "advantage=grpo",
        "scale_rewards=group",
        f"loss_aggregation={args.aggregation}",
        "minibatch_size=0",
        "ppo_epochs=1",
        "grad_accum=1",
        f"generation.batch_size={args.prompts * args.generations}",
        "dtype=float32",
        "mixed_precision=no",
        "gradient_checkpointing=false",
        "shuffle=false",
        "mask_truncated=false",
        f"seed={args.seed}",
        "save_steps=0",
        "progress=false",
        # TRL writes no run report (report_to="none" on its side); alignkit's report.html (matplotlib
        # figures, ~2 s after training) is left out the same way.
        "report=false",
    ]


def side_argv(side: str, args, out: Path) -> list[str]:
    """The child process of one side."""
    if side == "alignkit":
        return [sys.executable, "-m", "alignkit.cli", *alignkit_argv(args, out)]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        "trl",
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--prompts",
        str(args.prompts),
        "--generations",
        str(args.generations),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--lr",
        str(args.lr),
        "--beta",
        str(args.beta),
        "--aggregation",
        args.aggregation,
        "--seed",
        str(args.seed),
    ]


def run_process(argv: list[str], log: Path, timeout: float) -> dict:
    """Run `argv` with stdout and stderr to `log`; its wall time (start to exit), peak RSS and CPU time,
    all from the kernel (wait4), so neither side reports on itself. Killed after `timeout` seconds."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return {
        "returncode": proc.returncode,
        "timed_out": wall >= timeout and proc.returncode < 0,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def read_alignkit(out: Path) -> dict:
    """Per-step numbers from alignkit's output_dir/metrics.jsonl."""
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [m for m in lines if m.get("split") == "train"]
    return {
        "rewards": [m["reward"] for m in train],
        "completion_lengths": [m["completion_length"] for m in train],
        "kl": [m.get("kl") for m in train],
        "step_s": [m["time/step"] for m in train],
        "generation_s": [m["time/generation"] for m in train],
        "scoring_s": [m["time/scoring"] for m in train],
        "logprobs_s": [m["time/logprobs"] for m in train],
        "training_s": [m["time/training"] for m in train],
    }


# --- the TRL side (runs in the child) --------------------------------------------------------------------


def run_trl(args) -> None:
    """Train with TRL's GRPOTrainer in this process and write out/result.json."""
    require_trl()
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def vader(completions, **_):
        """VADER compound sentiment of each completion (the text TRL decoded, special tokens skipped)."""
        return [analyzer.polarity_scores(text)["compound"] for text in completions]

    class StepClock(TrainerCallback):
        """Each optimizer step's wall time, its pieces, and the metrics TRL logs for it."""

        def __init__(self):
            self.steps, self.logs, self.pieces, self.t = [], [], defaultdict(float), None

        @contextmanager
        def timing(self, piece: str):
            t = time.perf_counter()
            try:
                yield
            finally:
                self.pieces[piece] += time.perf_counter() - t

        def on_step_begin(self, *_, **__):
            self.pieces, self.t = defaultdict(float), time.perf_counter()

        def on_step_end(self, *_, **__):
            self.steps.append({"step_s": time.perf_counter() - self.t, **self.pieces})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "reward" in logs:
                self.logs.append(dict(logs))

    clock = StepClock()

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its generation, reward and no-grad log-prob passes timed (nothing else changed)."""

        def _generate_single_turn(self, *a, **k):
            with clock.timing("generation_s"):
                return super()._generate_single_turn(*a, **k)

        def _calculate_rewards(self, *a, **k):
            with clock.timing("scoring_s"):
                return super()._calculate_rewards(*a, **k)

        def _get_per_token_logps_and_entropies(self, *a, **k):
            if torch.is_grad_enabled():  # the training forward: part of "training"
                return super()._get_per_token_logps_and_entropies(*a, **k)
            with clock.timing("logprobs_s"):  # reference (and, if needed, sampling policy) log-probs
                return super()._get_per_token_logps_and_entropies(*a, **k)

    rows = [json.loads(line) for line in open(REPO / PROMPTS)]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    completions = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        beta=args.beta,
        use_bias_correction_kl=False,
        epsilon=0.2,
        scale_rewards="group",
        loss_type=TRL_AGGREGATION[args.aggregation],
        mask_truncated_completions=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        model_init_kwargs={"dtype": "float32"},
        disable_dropout=True,
        gradient_checkpointing=False,
        shuffle_dataset=False,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # The mapping in the docstring, checked against what TRL derived from it.
    if config.generation_batch_size != completions or config.steps_per_generation != 1:
        raise SystemExit(
            f"TRL derived generation_batch_size={config.generation_batch_size}, steps_per_generation="
            f"{config.steps_per_generation}; expected {completions} and 1 (one rollout per optimizer step)"
        )
    trainer = TimedGRPOTrainer(
        model=str(MODEL), reward_funcs=vader, args=config, train_dataset=dataset, callbacks=[clock]
    )
    trainer.train()
    trainer.save_model(str(args.out / "final"))
    logs = clock.logs
    steps = clock.steps
    result = {
        "rewards": [log["reward"] for log in logs],
        "completion_lengths": [log.get("completions/mean_length") for log in logs],
        "kl": [log.get("kl") for log in logs],
        "step_s": [s["step_s"] for s in steps],
        "generation_s": [s.get("generation_s", 0.0) for s in steps],
        "scoring_s": [s.get("scoring_s", 0.0) for s in steps],
        "logprobs_s": [s.get("logprobs_s", 0.0) for s in steps],
        "training_s": [
            s["step_s"] - s.get("generation_s", 0.0) - s.get("scoring_s", 0.0) - s.get("logprobs_s", 0.0)
            for s in steps
        ],
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / "result.json").write_text(json.dumps(result))


# --- the comparison --------------------------------------------------------------------------------------


def run_side(side: str, args, work: Path) -> dict:
    """One side, start to finish, in its own process; its process figures and per-step numbers."""
    out = work / side
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    quiet = wait_for_quiet(args.quiet_load, args.max_wait) if args.record else None
    load_before = os.getloadavg()[0]
    print(f"{side}: running (1-minute load average {load_before:.2f}; log in {out / 'log.txt'})", flush=True)
    proc = run_process(side_argv(side, args, out), out / "log.txt", args.timeout)
    if proc["returncode"] != 0:
        tail = (out / "log.txt").read_text()[-4000:]
        why = f"timed out after {args.timeout:.0f} s" if proc["timed_out"] else f"exit {proc['returncode']}"
        raise SystemExit(f"{tail}\n{side} run failed ({why}); full log: {out / 'log.txt'}")
    steps = read_alignkit(out) if side == "alignkit" else json.loads((out / "result.json").read_text())
    if len(steps["rewards"]) != args.steps or len(steps["step_s"]) != args.steps:
        raise SystemExit(
            f"{side}: expected {args.steps} logged steps, got {len(steps['rewards'])} rewards and "
            f"{len(steps['step_s'])} step times (see {out / 'log.txt'})"
        )
    return {"side": side, "load_before": load_before, "quiet_wait": quiet, **proc, **steps}


def summarise(r: dict, args) -> dict:
    """Throughput, memory and reward figures of one side."""
    n = args.steps * args.prompts * args.generations
    loop = sum(r["step_s"])
    rewards = r["rewards"]
    return {
        "side": r["side"],
        "completions/s (wall)": n / r["wall_s"],
        "completions/s (loop)": n / loop,
        "wall_s": r["wall_s"],
        "loop_s": loop,
        "median_step_s": statistics.median(r["step_s"]),
        "generation_s": sum(r["generation_s"]),
        "scoring_s": sum(r["scoring_s"]),
        "logprobs_s": sum(r["logprobs_s"]),
        "training_s": sum(r["training_s"]),
        "peak_rss_mib": r["peak_rss_mib"],
        "cpu_utilisation": r["cpu_s"] / r["wall_s"],
        "load_before": r["load_before"],
        "quiet_wait": r["quiet_wait"],
        "first_reward": rewards[0],
        "mean_first5_reward": statistics.mean(rewards[:5]),
        "mean_last5_reward": statistics.mean(rewards[-5:]),
        "mean_reward": statistics.mean(rewards),
        "mean_completion_length": statistics.mean(x for x in r["completion_lengths"] if x is not None),
        "last_kl": r["kl"][-1],
        "rewards": rewards,
    }


def report(rows: list[dict], args, info: dict) -> str:
    """The human-readable table and reward curves."""
    n = args.prompts * args.generations
    lines = [
        f"GRPO, CPU fp32, TinyStories-656K, VADER reward, {args.prompts} prompts x G={args.generations} = {n} "
        f"completions/step, {args.max_new_tokens} new tokens, {args.steps} steps, loss {args.aggregation}",
        f"machine: {info['cpu']}, {info['usable_cores']} usable cores, torch threads {info['torch_threads']}",
        "",
        f"{'':>9} {'compl/s wall':>12} {'compl/s loop':>12} {'wall s':>7} {'loop s':>7} {'gen s':>6} "
        f"{'score s':>7} {'logp s':>6} {'train s':>7} {'RSS MiB':>8} {'CPU use':>7} {'load':>5}",
    ]
    for r in rows:
        lines.append(
            f"{r['side']:>9} {r['completions/s (wall)']:>12.2f} {r['completions/s (loop)']:>12.2f} "
            f"{r['wall_s']:>7.1f} {r['loop_s']:>7.1f} {r['generation_s']:>6.1f} {r['scoring_s']:>7.2f} "
            f"{r['logprobs_s']:>6.1f} {r['training_s']:>7.1f} {r['peak_rss_mib']:>8.0f} "
            f"{r['cpu_utilisation']:>7.2f} {r['load_before']:>5.2f}"
        )
    lines += [
        "",
        f"{'':>9} {'reward step 1':>13} {'first-5 mean':>12} {'last-5 mean':>11} {'all-step mean':>13} "
        f"{'compl. length':>13} {'last KL':>8}",
    ]
    for r in rows:
        kl = f"{r['last_kl']:.4f}" if r["last_kl"] is not None else "-"
        lines.append(
            f"{r['side']:>9} {r['first_reward']:>13.3f} {r['mean_first5_reward']:>12.3f} "
            f"{r['mean_last5_reward']:>11.3f} {r['mean_reward']:>13.3f} {r['mean_completion_length']:>13.1f} "
            f"{kl:>8}"
        )
    lines += ["", "mean reward per step:", f"{'step':>5} " + " ".join(f"{r['side']:>9}" for r in rows)]
    for i in range(args.steps):
        lines.append(f"{i + 1:>5} " + " ".join(f"{r['rewards'][i]:>9.3f}" for r in rows))
    lines.append(
        "(train s: alignkit's time/training; TRL's is the step minus its timed generation, scoring and "
        "log-prob passes. CPU use: CPU seconds / wall seconds of the process; load: 1-minute load average "
        "before it started.)"
    )
    return "\n".join(lines)


def compact_json(data: dict) -> str:
    """JSON indented one space a level, with lists of numbers (the per-step curves) kept on one line."""
    text = json.dumps(data, indent=1)
    number = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
    return re.sub(
        rf"\[\s*({number}(?:,\s*{number})*)\s*\]",
        lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]",
        text,
    )


def record(summary: dict, text: str, command: str) -> None:
    """Append this run's section to RESULTS.md, replacing one with the same date and command."""
    path = HERE / "RESULTS.md"
    heading = f"## {summary['date']} — `{command}`"
    m = summary["machine"]
    section = (
        f"{heading}\n\nMachine: {m['cpu']}, {m['usable_cores']} usable of {m['cores']} cores, {m['os']}; "
        f"1-minute load average before each side: "
        + ", ".join(f"{r['side']} {r['load_before']:.2f}" for r in summary["results"])
        + f"\n\n```text\n{text}\n```\n\n```json\n{compact_json(summary)}\n```\n"
    )
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    start = current.find(heading + "\n")
    if start >= 0:
        end = current.find("\n## ", start + len(heading))
        current = current[:start] + section + ("" if end < 0 else current[end + 1 :])
    else:
        current = current.rstrip("\n") + "\n\n" + section
    path.write_text(current)
    print(f"recorded in {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--aggregation", choices=sorted(TRL_AGGREGATION), default="sequence_mean")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each side may run")
    p.add_argument("--only", choices=SIDES, help="run one side only")
    p.add_argument("--work", type=Path, default=HERE / ".fixture" / "grpo", help="run folders")
    p.add_argument("--record", action="store_true", help="wait for a quiet machine; append to RESULTS.md")
    p.add_argument("--quiet-load", type=float, default=0.8, help="--record: 1-minute load to wait for")
    p.add_argument("--max-wait", type=float, default=600.0, help="--record: longest wait per side (s)")
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "trl":
        return run_trl(args)
    if args.prompts * args.generations < 2 or args.generations < 2:
        raise SystemExit("--generations must be >= 2 (GRPO's advantage is relative to the group)")

    sides = [args.only] if args.only else list(SIDES)
    if "trl" in sides:
        require_trl()
    info = machine()
    rows = [summarise(run_side(side, args, args.work), args) for side in sides]
    text = report(rows, args, info)
    print("\n" + text)
    summary = {
        "date": date.today().isoformat(),
        "machine": info,
        "versions": versions(),
        "setting": {
            "steps": args.steps,
            "prompts_per_step": args.prompts,
            "num_generations": args.generations,
            "max_new_tokens": args.max_new_tokens,
            "lr": args.lr,
            "beta": args.beta,
            "loss_aggregation": {"alignkit": args.aggregation, "trl": TRL_AGGREGATION[args.aggregation]},
            "seed": args.seed,
            "alignkit_command": "alignkit "
            + " ".join(f"'{a}'" if " " in a else a for a in alignkit_argv(args, Path("OUT"))),
        },
        "results": rows,
    }
    if len(rows) == 2:
        trl, ak = rows
        summary["speedup_wall"] = ak["completions/s (wall)"] / trl["completions/s (wall)"]
        summary["speedup_loop"] = ak["completions/s (loop)"] / trl["completions/s (loop)"]
        # Step i shows both sides the same 8 prompts, so the per-step difference cancels how hard the
        # prompts are and leaves the sampling noise (and whatever one side learned that the other did not).
        diff = [a - t for a, t in zip(ak["rewards"], trl["rewards"])]
        summary["reward_diff_mean"] = statistics.mean(diff)
        summary["reward_diff_se"] = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else None
        extra = (
            f"\nspeed-up alignkit / TRL: {summary['speedup_wall']:.2f}x (whole process), "
            f"{summary['speedup_loop']:.2f}x (training loop)\n"
            f"reward, alignkit minus TRL on the same prompts, mean over steps: {summary['reward_diff_mean']:+.3f}"
        )
        if summary["reward_diff_se"] is not None:
            extra += f" (standard error {summary['reward_diff_se']:.3f})"
        text += "\n" + extra
        print(extra)
    print(json.dumps(summary))
    if args.record:
        argv = [a for a in sys.argv[1:] if a != "--record"]
        record(summary, text, " ".join(["python benchmarks/grpo_vs_trl.py", *argv]))


if __name__ == "__main__":
    main()
