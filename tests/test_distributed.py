"""Many processes, one result: every training command run on 2 CPU processes (gloo, `torchrun`) ends with
the same parameters on both processes, equal to a 1-process run of the same global batch split
differently (2 processes x 2 micro-batches vs 1 process x 4), and only the main process writes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.training.order import DataOrder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "distributed"))
import driver  # noqa: E402

GOOD = ["happy", "kind", "sunny", "warm", "smiled", "love"]
BAD = ["sad", "angry", "cold", "cried", "dark", "lost"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_for(command: str, n: int = 20) -> list[dict]:
    """n rows with a learnable signal, of prompts of different lengths (so padding differs by split)."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        prompt = "Tom went out" + " and on" * rng.randint(0, 4) + f" {i}. It was"

        def words(pool):
            return " " + " ".join(rng.choices(pool, k=rng.randint(2, 5))) + "."

        if command in ("dpo", "reward"):
            rows.append({"prompt": prompt, "chosen": words(GOOD), "rejected": words(BAD)})
        elif command == "sft":
            rows.append({"prompt": prompt, "completion": words(GOOD)})
        elif command == "kto":
            rows.append({"prompt": prompt, "completion": words(GOOD if i % 2 else BAD), "label": i % 2 == 1})
        else:  # listwise
            rows.append(
                {
                    "prompt": prompt,
                    "responses": [words(GOOD), words(BAD), words(GOOD + BAD)],
                    "scores": [1.0, -1.0, 0.0],
                }
            )
    return rows


def args_for(command: str, model: Path, data: str, out: Path, grad_accum: int, *extra: str) -> list[str]:
    return [
        command,
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "batch_size=2",
        f"grad_accum={grad_accum}",
        "epochs=2",  # 20 rows, 8 a step: steps 3 and 5 reach over an epoch's end
        "lr=1e-3",
        "warmup_ratio=0.0",
        "max_length=48",
        "max_prompt_length=32",
        "save_steps=0",
        "progress=false",
        "mixed_precision=no",
        "seed=5",
        *extra,
    ]


def launch(
    dump: Path, argv: list[str], processes: int = 2, *, ok: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    done = subprocess.run(
        [*cmd, str(HERE / "distributed" / "driver.py"), str(dump), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (done.returncode == 0) is ok, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def ranks_agree_and_moved(dump: Path, start_dir: Path) -> None:
    """Both processes' dumped parameters are equal (the gradient all-reduce ran) and moved from the causal
    model in `start_dir`."""
    rank0, rank1 = (load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1))
    start = load_file(str(start_dir / "model.safetensors"))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    assert any(not torch.equal(rank0[n], start[n.removeprefix("model.")]) for n in rank0)


def relative_difference(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over all parameters: how far two trainings ended apart, relative to how
    far training moved. (Per element, Adam turns float-rounding noise in a near-zero gradient into an
    lr-sized step, so a max-abs-difference test would measure Adam, not the split.)"""
    assert a.keys() == b.keys()
    diff = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in a) ** 0.5
    moved = sum(float((b[n] - start[n]).double().pow(2).sum()) for n in b) ** 0.5
    return diff / moved


COMMANDS = ["sft", "dpo", "kto", "listwise", "reward"]
# KTO's reference point z0 is estimated per micro-batch and averaged over processes (as the paper and
# TRL do): 2 processes estimate each z0 from 4 mismatched pairs, 1 process from 2, so the runs differ a
# little by design (measured: 0.3% of the update). The other objectives have no batch statistic.
# For the others the difference is float rounding (gradients summed in another order), which Adam's
# normalisation carries into the weights: measured 6e-7 (sft) to 2e-5 (listwise) of the update.
TOLERANCE = {"sft": 1e-4, "dpo": 1e-4, "listwise": 1e-4, "reward": 1e-4, "kto": 1e-2}


@pytest.mark.parametrize("command", COMMANDS)
def test_two_processes_train_what_one_process_trains(tmp_path, tiny_model_dir, command):
    data = write_jsonl(tmp_path / "rows.jsonl", rows_for(command))
    extra = ("beta=0.5",) if command in ("dpo", "kto", "listwise") else ()

    # 1 process, 4 micro-batches of 2 rows a step (in this process, through the same driver)
    one = tmp_path / "one"
    assert driver.run(str(one / "dump"), args_for(command, tiny_model_dir, data, one, 4, *extra)) == 0
    # 2 processes, 2 micro-batches of 2 rows each: the same 8 rows a step
    two = tmp_path / "two"
    launch(two / "dump", args_for(command, tiny_model_dir, data, two, 2, *extra))

    rank0, rank1 = (load_file(str(two / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # the processes did not drift apart
    single = load_file(str(one / "dump" / "rank0.safetensors"))
    # Trained from the same start: the head of a reward model is new, so it starts where 1 process's did.
    start = {n: start.get(n.removeprefix("model."), single[n]) for n in single}
    start = {n: v if v.shape == single[n].shape else single[n] for n, v in start.items()}
    difference = relative_difference(rank0, single, start)
    print(f"{command}: 2 processes vs 1, relative difference {difference:.1e}")
    assert difference < TOLERANCE[command]

    # only the main process wrote: one metrics line per step, the same steps and losses as 1 process
    def train_losses(out: Path) -> list[tuple[int, float]]:
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"]) for m in lines if m["split"] == "train"]

    one_losses, two_losses = train_losses(one), train_losses(two)
    assert [s for s, _ in two_losses] == list(range(1, 6))
    if command != "kto":  # (KTO's logged loss follows its per-micro-batch z0)
        assert [loss for _, loss in two_losses] == pytest.approx([loss for _, loss in one_losses], rel=1e-4)
    assert (two / "final" / "config.json").exists()


def test_two_process_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", rows_for("dpo"))
    whole = tmp_path / "whole"
    launch(whole / "dump", args_for("dpo", tiny_model_dir, data, whole, 2, "max_steps=4"))
    cut = tmp_path / "cut"
    launch(cut / "dump", args_for("dpo", tiny_model_dir, data, cut, 2, "max_steps=4", "save_steps=2"))
    for later in ("checkpoint-4",):
        shutil.rmtree(cut / "checkpoints" / later, ignore_errors=True)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["checkpoint-2"]
    launch(cut / "dump", args_for("dpo", tiny_model_dir, data, cut, 2, "max_steps=4", "resume=true"))
    resumed, uninterrupted = (load_file(str(d / "dump" / "rank1.safetensors")) for d in (cut, whole))
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in resumed)


def test_two_process_grpo_keeps_the_processes_in_step(tmp_path, tiny_model_dir):
    """Online RL on 2 processes: each samples its own prompts with its own seeds, and after the updates
    both hold the same parameters (the gradient all-reduce ran); the main process alone logs."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom went out {i}. It was"}) + "\n" for i in range(16)))
    out = tmp_path / "grpo"
    argv = [
        "grpo",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={out}",
        "rewards=[{type: regex, pattern: e, mode: count}]",
        "batch_size=2",
        "num_generations=4",
        "generation.max_new_tokens=6",
        "max_steps=3",
        "lr=1e-2",
        "beta=0.1",
        "minibatch_size=4",
        "grad_accum=2",
        "save_steps=0",
        "progress=false",
        "mixed_precision=no",
    ]
    launch(out / "dump", argv)
    ranks_agree_and_moved(out / "dump", tiny_model_dir)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_two_process_stop_on_alarm_stops_every_process_after_the_same_step(tmp_path, tiny_model_dir):
    """A verifier that never passes, on 2 processes: the zero-std alarm reads the whole step's share (1 from the
    first step; the mean of 3 steps fires at step 3), so both processes stop after step 3, none is left waiting in
    a collective (the launch would time out), and step 3 is checkpointed once, by the main process."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom went out {i}. It was"}) + "\n" for i in range(16)))
    out = tmp_path / "grpo"
    argv = [
        "grpo",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={out}",
        "rewards=[{type: regex, pattern: QQQQQQ, mode: count}]",
        "batch_size=2",
        "num_generations=4",
        "generation.max_new_tokens=6",
        "max_steps=6",
        "beta=0",
        "save_steps=0",
        "progress=false",
        "report=false",
        "mixed_precision=no",
        "alarms.stop_on_alarm=true",
    ]
    done = launch(out / "dump", argv, ok=False)
    assert done.stderr.count("stopped by alarms.stop_on_alarm after step 3") == 2, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and lines[-1]["alarm/zero_std_groups"] == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-3"]


def test_two_process_online_dpo_keeps_the_processes_in_step(tmp_path, tiny_model_dir):
    """Online DPO on 2 processes: each pairs its own samples; min_gap 2 leaves some prompts (and, in some
    steps, a whole process) without a pair, which must still join the all-reduce with weight 0."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom went out {i}. It was"}) + "\n" for i in range(16)))
    out = tmp_path / "online-dpo"
    argv = [
        "online-dpo",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={out}",
        "rewards=[{type: regex, pattern: e, mode: count}]",
        "batch_size=2",
        "num_generations=2",
        "generation.max_new_tokens=6",
        "max_steps=4",
        "min_gap=2",
        "lr=1e-2",
        "save_steps=0",
        "progress=false",
        "report=false",
        "mixed_precision=no",
    ]
    launch(out / "dump", argv)
    ranks_agree_and_moved(out / "dump", tiny_model_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert any(r["pairs/below_gap"] > 0 for r in records)  # the tie path ran


def test_two_process_iterative_dpo_shares_the_sampling_and_trains_as_one(tmp_path, tiny_model_dir):
    """Iterative DPO on 2 processes: each samples and scores its half of a round's prompts, the main process
    merges them in prompt order, and every round's DPO leaves both processes with the same parameters."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom went out {i}. It was"}) + "\n" for i in range(7)))
    out = tmp_path / "iterative"
    argv = [
        "iterative-dpo",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={out}",
        "rewards=[{type: regex, pattern: e, mode: count}]",
        "rounds=2",
        "num_generations=3",
        "generation.max_new_tokens=6",
        "batch_size=2",
        "max_steps=2",
        "lr=1e-2",
        "save_steps=0",
        "progress=false",
        "report=false",
        "mixed_precision=no",
    ]
    launch(out / "dump", argv)
    ranks_agree_and_moved(out / "dump", tiny_model_dir)
    for k in (1, 2):
        samples = [
            json.loads(line) for line in (out / f"round-{k}" / "samples.jsonl").read_text().splitlines()
        ]
        assert [s["index"] for s in samples] == list(range(7))  # both halves, in prompt order
        assert all(len(s["candidates"]) == 3 for s in samples)
        assert not list((out / f"round-{k}").glob("samples.part-*"))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_data_order_shards_every_row_once_per_epoch_across_processes():
    """20 rows, 3 processes x 2 micro-batches x 2 rows = 12 a step: steps 1-5 are 60 rows, 3 epochs, each
    row exactly once per epoch, on exactly one process; each step's rows do not depend on the split."""
    orders = [DataOrder(20, 2, 2, seed=3, world=3, rank=r) for r in range(3)]
    seen = [i for s in range(5) for o in orders for mb in o.micro_batches(s) for i in mb]
    assert len(seen) == 60
    stream = [i for s in range(5) for i in orders[0].step_rows(s)]
    for epoch in range(3):
        assert sorted(stream[20 * epoch : 20 * (epoch + 1)]) == list(range(20))
    one = DataOrder(20, 2, 6, seed=3)  # 1 process x 6 micro-batches: the same rows every step
    for s in range(5):
        split = sorted(i for o in orders for mb in o.micro_batches(s) for i in mb)
        assert split == sorted(i for mb in one.micro_batches(s) for i in mb)


def test_two_process_ppo_on_an_encoder_decoder_keeps_the_processes_in_step(tmp_path, tiny_t5_dir):
    """PPO with a T5 policy and its critic as one DDP module on 2 processes: after the updates both
    processes hold the same policy (every trainable parameter of policy and critic took part in the
    loss, or DDP would have failed), and the main process alone logs."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom went out {i}. It was"}) + "\n" for i in range(16)))
    out = tmp_path / "ppo"
    argv = [
        "ppo",
        f"model={tiny_t5_dir}",
        f"data={data}",
        f"output_dir={out}",
        "rewards=[{type: regex, pattern: e, mode: count}]",
        "batch_size=4",
        "generation.max_new_tokens=6",
        "max_steps=2",
        "lr=1e-2",
        "kl_coef=0.1",
        "ppo_epochs=2",
        "minibatch_size=2",
        "save_steps=0",
        "progress=false",
        "mixed_precision=no",
    ]
    launch(out / "dump", argv)
    rank0, rank1 = (load_file(str(out / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    start = load_file(str(tiny_t5_dir / "model.safetensors"))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    assert any(n in start and not torch.equal(rank0[n], start[n]) for n in rank0)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# Prompts 4s+2 and 4s+3 of step s go to process 1 (batch_size 2, shuffle off), and are marked BIG: the
# second source counts an "e" 9 more times when the prompt is BIG, so process 1's rewards are on a scale
# ~10x process 0's.
SCALED_E_COUNT = (
    "rewards=[{type: regex, name: e, pattern: e, mode: count}, "
    "{type: regex, name: big, pattern: 'e(?=.*BIG)', flags: s, mode: count, text: '{response} {prompt}', "
    "weight: 9}]"
)


def scaled_prompts(path: Path) -> Path:
    path.write_text(
        "".join(
            json.dumps({"prompt": f"Tom went out {i}. It was" + (" BIG" if i % 4 >= 2 else "")}) + "\n"
            for i in range(16)
        )
    )
    return path


def online_argv(command: str, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        command,
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        SCALED_E_COUNT,
        "batch_size=2",
        "generation.max_new_tokens=6",
        "lr=1e-2",
        "shuffle=false",
        "save_steps=0",
        "progress=false",
        "report=false",
        "mixed_precision=no",
        *extra,
    ]


@pytest.mark.parametrize(
    "advantage", [("advantage=grpo", "scale_rewards=batch"), ("advantage=reinforce_pp",)], ids=lambda a: a[-1]
)
def test_two_process_batch_advantages_and_metrics_are_the_whole_steps(tmp_path, tiny_model_dir, advantage):
    """GRPO's batch std and REINFORCE++'s batch statistics are the step's, not each process's: every
    process trains on its rows of the advantages one process computes from all the step's rewards
    (the issue's reproduction: rewards [1,0,1,0 | 10,0,10,0], G=2 gave ±0.111 / ±1.112 per process,
    ±0.866 over the step), and every logged rollout figure is the whole step's."""
    from alignkit.losses.policy import compute_advantages
    from alignkit.training.alarm_stats import distinct_n, pearson, repeats_ngram

    out = tmp_path / "grpo"
    G = 2
    argv = online_argv(
        "grpo", tiny_model_dir, scaled_prompts(tmp_path / "p.jsonl"), out, *advantage,
        f"num_generations={G}", "max_steps=3", "beta=0",
    )  # fmt: skip
    launch(out / "dump", argv)
    ranks = [json.loads((out / "dump" / f"rank{r}.online.json").read_text()) for r in (0, 1)]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scale = {"scale": "batch"} if "scale_rewards=batch" in advantage else {}
    name = advantage[0].split("=")[1]
    for step, line in enumerate(lines):
        shares = [torch.tensor(rank["rollouts"][step]["scores"]) for rank in ranks]
        whole = torch.cat(shares)
        assert shares[1].std() > 3 * shares[0].std(), shares  # the processes' scales differ
        expected = compute_advantages(name, whole, G, **scale)
        for r, rank in enumerate(ranks):  # one micro-batch a step: the rollout's rows in order
            trained = torch.tensor(rank["advantages"][step])
            assert torch.allclose(trained, expected[r * 4 : (r + 1) * 4], atol=1e-6), (step, r)
        # the logged figures are the whole step's
        lengths = [n for rank in ranks for n in rank["rollouts"][step]["lengths"]]
        ended = [e for rank in ranks for e in rank["rollouts"][step]["ended"]]
        assert line["reward"] == pytest.approx(float(whole.mean()), abs=1e-6)
        assert line["reward_std"] == pytest.approx(float(whole.std(unbiased=False)), abs=1e-6)
        assert line["advantages/std"] == pytest.approx(float(expected.std(unbiased=False)), abs=1e-6)
        assert line["completion_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert line["frac_eos"] == pytest.approx(sum(ended) / len(ended))
        # ... the alarms' figures too: every process decides the same stop
        ids = [c for rank in ranks for c in rank["rollouts"][step]["ids"]]
        alarm = {k.split("/", 2)[2]: v for k, v in line.items() if k.startswith("alarm_stats/")}
        r = pearson(lengths, whole.tolist())  # (None where every completion has one length)
        assert alarm.get("len_reward_corr") == (r if r is None else pytest.approx(r, abs=1e-6))
        assert alarm["distinct_2"] == pytest.approx(distinct_n(ids, 2))
        assert alarm["distinct_3"] == pytest.approx(distinct_n(ids, 3))
        assert alarm["repeated"] == pytest.approx(sum(repeats_ngram(c, 4) for c in ids) / len(ids))


def guided_two_process_run(tmp_path, tiny_model_dir, *guide_settings: str) -> tuple[list[dict], list[dict]]:
    """3 grpo steps on 2 processes with the e-count guide and `guide_settings`, G 4: (each process's dump, the
    metrics lines), after checking both processes ended with the same, moved parameters."""
    from tests.test_guide_traces import e_count_guide

    guide = e_count_guide(tmp_path / "guide")
    out = tmp_path / "grpo"
    argv = online_argv(
        "grpo", tiny_model_dir, scaled_prompts(tmp_path / "p.jsonl"), out, "num_generations=4", "max_steps=3",
        "beta=0.1", f"guide.model={guide}", *guide_settings,
    )  # fmt: skip
    launch(out / "dump", argv)
    ranks_agree_and_moved(out / "dump", tiny_model_dir)
    ranks = [json.loads((out / "dump" / f"rank{r}.online.json").read_text()) for r in (0, 1)]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    return ranks, lines


def test_two_process_guide_traces_keep_the_processes_in_step_and_log_the_whole_step(tmp_path, tiny_model_dir):
    """guide.mode=traces on 2 processes: each process's groups hold k = 1 guide trace after the policy's own
    3 samples, the processes end with the same parameters, and the guide figures are the whole step's (the
    mean score of every process's traces, and of every process's own samples)."""
    ranks, lines = guided_two_process_run(tmp_path, tiny_model_dir, "guide.mode=traces", "guide.traces=1")
    for step, line in enumerate(lines):
        rollouts = [rank["rollouts"][step] for rank in ranks]
        for rollout in rollouts:  # 2 prompts a process, each group: 3 of the policy's, then the guide's 1
            assert rollout["guide_trace"] == [0.0, 0.0, 0.0, 1.0] * 2
        flags = [f for rollout in rollouts for f in rollout["guide_trace"]]
        scores = [s for rollout in rollouts for s in rollout["scores"]]
        traces = [s for s, f in zip(scores, flags) if f]
        own = [s for s, f in zip(scores, flags) if not f]
        assert line["guide/traces"] == 1
        assert line["guide/reward_traces"] == pytest.approx(sum(traces) / len(traces), abs=1e-6)
        assert line["guide/reward_policy"] == pytest.approx(sum(own) / len(own), abs=1e-6)
        assert line["reward"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)


def test_two_process_guide_mixture_keeps_the_processes_in_step_and_logs_the_whole_step(
    tmp_path, tiny_model_dir
):
    """guide.mode=mixture (α 0.99) on 2 processes: the processes end with the same parameters, and the guide
    figures are the whole step's: the shares of tokens and of completions the guide changed and the mean
    score of each kind, over both processes' completions. (The e-count guide's logits swamp this near-uniform
    tiny policy even at 1%: every completion has a changed token, 94% of the tokens are; the token share is the
    figure that tells one process from two.)"""
    ranks, lines = guided_two_process_run(tmp_path, tiny_model_dir, "guide.alpha=0.99")
    seen = set()
    for step, line in enumerate(lines):
        rollouts = [rank["rollouts"][step] for rank in ranks]
        changed = [n > 0 for rollout in rollouts for n in rollout["tokens_changed"]]
        scores = [s for rollout in rollouts for s in rollout["scores"]]
        lengths = [n for rollout in rollouts for n in rollout["lengths"]]
        tokens = sum(n for rollout in rollouts for n in rollout["tokens_changed"])
        assert len(changed) == len(scores) == 16
        assert line["guide/alpha"] == 0.99
        assert line["guide/frac_changed"] == pytest.approx(sum(changed) / 16, abs=1e-6)
        assert line["guide/frac_tokens_changed"] == pytest.approx(tokens / sum(lengths), abs=1e-6)
        for name, keep in (("changed", True), ("unchanged", False)):
            part = [s for s, c in zip(scores, changed) if c == keep]
            if part:
                assert line[f"guide/reward_{name}"] == pytest.approx(sum(part) / len(part), abs=1e-6)
                seen.add(name)
    assert "changed" in seen
    assert any(0 < line["guide/frac_tokens_changed"] < 1 for line in lines)


def test_two_process_run_with_a_reward_normaliser_resumes_exactly(tmp_path, tiny_model_dir):
    """reward_normalize=true on 2 processes: one normaliser state, of every process's scores (identical on
    both), so the checkpoint's is everyone's and a run killed after its step-2 checkpoint and resumed
    ends as the uninterrupted run does, metrics and parameters (before: each process kept statistics
    of its own scores and only the main process's were saved)."""
    data = scaled_prompts(tmp_path / "p.jsonl")
    settings = ("num_generations=2", "max_steps=4", "beta=0", "reward_normalize=true", "save_steps=2")
    whole = tmp_path / "whole"
    launch(whole / "dump", online_argv("grpo", tiny_model_dir, data, whole, *settings))
    cut = tmp_path / "cut"  # killed after step 2's checkpoint: what was on disk then
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", cut / "checkpoints" / "checkpoint-2")
    for name in ("metrics.jsonl", "config.yaml"):
        if (whole / name).exists():
            shutil.copy(whole / name, cut / name)
    launch(cut / "dump", online_argv("grpo", tiny_model_dir, data, cut, *settings, "resume=true"))

    def train_lines(out: Path) -> list[dict]:
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [
            {k: v for k, v in m.items() if not k.startswith(("time/", "tokens/s"))}
            for m in lines
            if m["split"] == "train"
        ]

    assert train_lines(cut) == train_lines(whole)
    for r in (0, 1):
        resumed, uninterrupted = (load_file(str(d / "dump" / f"rank{r}.safetensors")) for d in (cut, whole))
        assert all(torch.equal(resumed[n], uninterrupted[n]) for n in resumed)


def test_two_process_ppo_whitens_with_the_whole_steps_statistics(tmp_path, tiny_model_dir):
    """PPO's reward whitening (whiten_rewards=true) and advantage whitening take the mean and std of the
    whole step, every process's completion tokens, as OpenRLHF all-reduces them: each process's whitened
    values are its slice of one process whitening the step's values (process 1's rewards are ~10x
    process 0's). The logged score, returns, values and explained variance are the whole step's too."""
    from alignkit.losses.masks import whiten
    from alignkit.losses.ppo import explained_variance

    out = tmp_path / "ppo"
    argv = online_argv(
        "ppo", tiny_model_dir, scaled_prompts(tmp_path / "p.jsonl"), out,
        "max_steps=2", "kl_coef=0.05", "whiten_rewards=true",
    )  # fmt: skip
    launch(out / "dump", argv)
    ranks = [json.loads((out / "dump" / f"rank{r}.online.json").read_text()) for r in (0, 1)]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and [len(rank["whitened"]) for rank in ranks] == [4, 4]  # rewards, advantages
    for call in range(4):
        shares = [torch.tensor(rank["whitened"][call]["values"]) for rank in ranks]
        whole = torch.cat(shares)
        if call % 2 == 0:  # the rewards: process 1's scale is ~10x process 0's
            assert shares[1].abs().max() > 3 * shares[0].abs().max(), shares
        shift_mean = ranks[0]["whitened"][call]["shift_mean"]
        expected = whiten(whole[None], torch.ones_like(whole[None]), shift_mean=shift_mean)[0]
        got = torch.cat([torch.tensor(rank["whitened"][call]["whitened"]) for rank in ranks])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for step, line in enumerate(lines):
        shaped = {
            k: torch.tensor([x for rank in ranks for x in rank["shaped"][step][k]])
            for k in ranks[0]["shaped"][0]
        }
        returns, values = shaped["returns"], shaped["values"]
        assert line["score"] == pytest.approx(float(shaped["scores"].mean()), abs=1e-5)
        assert line["returns/mean"] == pytest.approx(float(returns.mean()), abs=1e-5)
        assert line["values/mean"] == pytest.approx(float(values.mean()), abs=1e-5)
        ev = explained_variance(values[None], returns[None], torch.ones_like(values[None]))
        assert line["explained_variance"] == pytest.approx(float(ev), abs=1e-5)


def test_two_process_online_dpo_logs_the_whole_steps_pair_statistics(tmp_path, tiny_model_dir):
    """online-dpo's pairs/* figures are the whole step's: counts (prompts, pairs, below_gap, duplicates)
    summed over the processes' tables, the mean gap over every kept pair. Process 1's rewards are ~10x
    process 0's, so with min_gap=2 its pairs clear the gap where process 0's mostly do not."""
    out = tmp_path / "online-dpo"
    argv = online_argv(
        "online-dpo", tiny_model_dir, scaled_prompts(tmp_path / "p.jsonl"), out,
        "num_generations=2", "max_steps=3", "min_gap=2",
    )  # fmt: skip
    launch(out / "dump", argv)
    ranks = [json.loads((out / "dump" / f"rank{r}.online.json").read_text()) for r in (0, 1)]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    shares = [[rank["pairs"][step]["stats"] for rank in ranks] for step in range(3)]
    assert any(a["pairs/below_gap"] != b["pairs/below_gap"] for a, b in shares)  # the processes differ
    for line, (a, b), step in zip(lines, shares, range(3)):
        for key in ("pairs/prompts", "pairs/pairs", "pairs/below_gap", "pairs/duplicates"):
            assert line[key] == a[key] + b[key], (step, key)
        gaps = [g for rank in ranks for g in rank["pairs"][step]["gaps"]]
        if gaps:
            assert line["pairs/gap_mean"] == pytest.approx(sum(gaps) / len(gaps))
        else:
            assert "pairs/gap_mean" not in line


def test_two_process_reward_source_counters_are_reduced_over_processes(tmp_path, tiny_model_dir):
    """The reward sources' own figures are the whole step's: a judge's counters (answers, fallbacks,
    requests, ...: cumulative counts) summed over the processes, a classifier ensemble's uncertainty (a
    mean over the rows it scored) averaged over them weighted by rows (equal here: 4 rows each)."""
    from conftest import TINYSTORIES, build_tiny_classifier

    words = ["tom", "went", "out", "it", "was", "big", ".", *map(str, range(16))]
    classifier = build_tiny_classifier(tmp_path / "cls", ["reward_0", "reward_1", "reward_2"], words)
    judge = (
        f"{{type: judge, name: judge, backend: local, model: {TINYSTORIES}, template: toxicity, "
        "max_tokens: 4, parse_retries: 0, device: cpu, weight: 0.1}"
    )
    rewards = f"rewards=[{{type: classifier, name: cls, model: {classifier}, text: '{{prompt}} {{response}}'}}, {judge}]"
    out = tmp_path / "grpo"
    argv = online_argv(
        "grpo", tiny_model_dir, scaled_prompts(tmp_path / "p.jsonl"), out, "num_generations=2", "max_steps=2", "beta=0"
    )  # fmt: skip
    argv = [rewards if a.startswith("rewards=") else a for a in argv]
    launch(out / "dump", argv)
    ranks = [json.loads((out / "dump" / f"rank{r}.online.json").read_text()) for r in (0, 1)]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for step, line in enumerate(lines):
        shares = [rank["rollouts"][step]["reward_stats"] for rank in ranks]
        counters = {k.split("/", 1)[1] for share in shares for k in share if k.startswith("judge/")}
        counters -= {"mean", "std", "min", "max"}  # (the scores' own statistics: gathered separately)
        assert {"answers", "scored", "backend_requests"} <= counters
        for name in counters:
            expected = sum(share.get(f"judge/{name}", 0.0) for share in shares)
            assert line[f"rewards/judge/{name}"] == expected, (step, name)
        uncertainty = [share["cls/uncertainty"] for share in shares]
        assert (
            abs(uncertainty[0] - uncertainty[1]) > 1e-8
        )  # the processes differ (a random tiny BERT: a little)
        assert line["rewards/cls/uncertainty"] == pytest.approx(sum(uncertainty) / 2, rel=1e-12)
