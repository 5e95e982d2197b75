"""Training runs on tiny models: learning, resume, reference modes, SFT accumulation, the CLI."""

import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.algorithms import dpo, sft
from alignkit.config.base import ReferenceSettings
from alignkit.config.preference import DPOConfig
from alignkit.config.supervised import SFTConfig
from alignkit.training.loop import RunInterrupted
from tests.conftest import ctrl_c

GOOD = ["happy", "kind", "sunny", "warm", "smiled", "love", "friends", "fun"]
BAD = ["sad", "angry", "cold", "cried", "dark", "lost", "broke", "mean"]
NAMES = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia", "Sam", "Anna", "Tim", "Zoe"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sentiment_pairs(n, seed):
    """Pairs whose chosen completion uses 'good' words and rejected 'bad' words: a learnable signal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(NAMES)} went to the {rng.choice(['park', 'sea', 'shop', 'woods'])}. It was"
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + " ".join(rng.choices(GOOD, k=3)) + ".",
                "rejected": " " + " ".join(rng.choices(BAD, k=3)) + ".",
            }
        )
    return rows


def dpo_config(tmp_path, model, data, **overrides):
    base = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / "out"),
        batch_size=4,
        lr=1e-3,
        beta=0.1,
        max_length=64,
        max_prompt_length=32,
        warmup_ratio=0.0,
        progress=False,
        save_steps=0,
        seed=3,
    )
    base.update(overrides)
    return DPOConfig(**base)


def read_metrics(cfg, split="train"):
    lines = (tmp := open(f"{cfg.output_dir}/metrics.jsonl")).read().splitlines()
    tmp.close()
    return [json.loads(line) for line in lines if json.loads(line)["split"] == split]


def test_dpo_learns_a_learnable_preference(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(96, seed=0))
    held_out = write_jsonl(tmp_path / "eval.jsonl", sentiment_pairs(32, seed=1))
    cfg = dpo_config(tmp_path, tiny_model_dir, train, eval_data=held_out, epochs=2, eval_steps=1000)
    dpo.train(cfg)
    evals = read_metrics(cfg, "eval")
    first_train = read_metrics(cfg)[0]
    assert first_train["loss"] == pytest.approx(0.693147, abs=1e-5)  # ln 2: policy == reference at step 1
    assert evals[-1]["rewards/accuracies"] > 0.9
    assert evals[-1]["loss"] < 0.5
    # the saved model loads back with transformers
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")


def test_interrupted_run_resumes_with_identical_losses(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(40, seed=2))
    full = dpo_config(tmp_path / "a", tiny_model_dir, data, max_steps=6, lora={"enabled": False})
    full.lora = DPOConfig().lora
    dpo.train(full)
    expected = [m["loss"] for m in read_metrics(full)]

    # Second run: Ctrl-C during the 4th optimizer step -> step 4 finished, checkpointed, exit 130.
    cut = dpo_config(tmp_path / "b", tiny_model_dir, data, max_steps=6)
    original = torch.optim.AdamW.step
    calls = []

    def interrupt_on_fourth_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            ctrl_c()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_on_fourth_step)
    with pytest.raises(RunInterrupted) as stopped:  # a KeyboardInterrupt: a notebook stops as on any Ctrl-C
        dpo.train(cut)
    assert (stopped.value.step, stopped.value.dropped) == (4, False)
    assert [p.name for p in (tmp_path / "b" / "out" / "checkpoints").iterdir()] == ["checkpoint-4"]
    monkeypatch.setattr(torch.optim.AdamW, "step", original)

    cut.resume = True
    dpo.train(cut)
    resumed = [m["loss"] for m in read_metrics(cut)]
    assert resumed == expected  # bit-for-bit, including the steps after the interruption
    assert len(resumed) == 6


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_reference_equals_on_the_fly(tmp_path, tiny_model_dir, lora):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(24, seed=4))
    modes = ["precomputed", "adapter" if lora else "copy"]
    losses = {}
    for mode in modes:
        cfg = dpo_config(
            tmp_path / mode, tiny_model_dir, data, max_steps=4, reference=ReferenceSettings(mode=mode)
        )
        cfg.lora.enabled = lora
        cfg.lora.dropout = 0.0
        dpo.train(cfg)
        losses[mode] = [(m["loss"], m["rewards/margins"]) for m in read_metrics(cfg)]
    a, b = losses.values()
    assert losses[modes[0]][1][0] != pytest.approx(0.6931, abs=1e-4)  # training moved the policy
    for (la, ma), (lb, mb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5) and ma == pytest.approx(mb, abs=1e-5)


def test_sft_loss_does_not_depend_on_micro_batch_split(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": f"{n} went out.", "completion": " " + " ".join(GOOD[: 1 + i % 6]) + "."}
        for i, n in enumerate(NAMES * 2)
    ]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    weights = []
    for name, batch_size, accum in (("one", 8, 1), ("four", 2, 4)):
        cfg = SFTConfig(
            model=str(tiny_model_dir),
            data=data,
            output_dir=str(tmp_path / name),
            batch_size=batch_size,
            grad_accum=accum,
            max_steps=2,
            lr=1e-3,
            progress=False,
            save_steps=0,
            max_length=64,
        )
        sft.train(cfg)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final")
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    # Same 8 rows per step, split 1x8 or 4x2: token-mean loss gives the same update.
    torch.testing.assert_close(weights[0], weights[1], atol=2e-6, rtol=0)


def test_sft_lowers_completion_loss(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"{n} said", "completion": " I am happy and kind."} for n in NAMES]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = SFTConfig(
        model=str(tiny_model_dir),
        data=data,
        output_dir=str(tmp_path / "o"),
        batch_size=5,
        max_steps=30,
        lr=1e-2,
        progress=False,
        save_steps=0,
        eval_data=data,
        eval_steps=30,
        warmup_ratio=0.0,
    )
    sft.train(cfg)
    train = read_metrics(cfg)
    assert read_metrics(cfg, "eval")[-1]["loss"] < 0.5 * train[0]["loss"]


def test_cli_dpo_end_to_end_on_hh(tmp_path, tiny_model_dir, hh_sample):
    subset = tmp_path / "hh.jsonl"
    subset.write_text("".join(open(hh_sample).readlines()[:48]))
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit.cli",
            "dpo",
            f"model={tiny_model_dir}",
            f"data={subset}",
            f"output_dir={out}",
            "max_steps=3",
            "batch_size=4",
            "max_length=96",
            "max_prompt_length=64",
            "eval_fraction=0.2",
            "eval_steps=3",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "tokens/s",
    ):
        assert key in metrics[0], key
    assert any(m["split"] == "eval" for m in metrics)
    assert (out / "config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 2048


def test_cli_reports_bad_data_before_training(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit.cli",
            "dpo",
            f"model={tiny_model_dir}",
            f"data={bad}",
            f"output_dir={tmp_path / 'o'}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "bad.jsonl:2" in proc.stderr and "rejected" in proc.stderr
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.parametrize("merge", [False, True])
def test_lora_run_saves_adapter_or_merged_model(tmp_path, tiny_model_dir, merge):
    from peft import PeftModel

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(16, seed=5))
    cfg = dpo_config(
        tmp_path,
        tiny_model_dir,
        data,
        max_steps=3,
        reference=ReferenceSettings(mode="adapter"),
        gradient_checkpointing=True,
    )
    cfg.lora.enabled, cfg.lora.merge, cfg.lora.r = True, merge, 4
    final = dpo.train(cfg)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if merge:
        assert not (final / "adapter_model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(final)
    else:
        assert (final / "adapter_model.safetensors").exists()
        model = PeftModel.from_pretrained(base, final).merge_and_unload()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        name for (name, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)
    ]
    assert changed and all("proj" in n for n in changed)  # only adapted linear layers moved


def test_a_saved_adapter_loads_as_its_base_with_the_adapter_merged_and_evaluates(tmp_path, tiny_model_dir):
    """lora.merge=false saves the adapter alone; load_causal_lm (and so alignkit eval, generate, a next
    round) loads it onto its base and merges it: the logits equal peft's own base + adapter."""
    from peft import PeftModel

    from alignkit.cli import main
    from alignkit.models.load import load_causal_lm

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(16, seed=5))
    cfg = dpo_config(tmp_path, tiny_model_dir, data, max_steps=2, reference=ReferenceSettings(mode="adapter"))
    cfg.lora.enabled, cfg.lora.r = True, 4
    final = dpo.train(cfg)
    assert not (final / "config.json").exists()  # the adapter alone
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    ours = load_causal_lm(str(final))(input_ids=ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final).eval()
    torch.testing.assert_close(ours, peft(input_ids=ids).logits)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "I feel"}, {"prompt": "The day"}])
    argv = ["eval", f"base_model={tiny_model_dir}", f"model={final}", f"prompts={prompts}"]
    assert (
        main([*argv, f"output_dir={tmp_path / 'eval'}", "generation.max_new_tokens=4", "num_samples=1"]) == 0
    )
    assert (tmp_path / "eval" / "eval_report.json").is_file()
