"""Stepwise DPO (each stage against the previous stage's model) and constraint terms: the penalties by
hand, their settings and flag columns, and a run where a safety constraint lowers the implicit reward of
flagged responses."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.algorithms import dpo, sdpo
from alignkit.cli import main
from alignkit.config.preference import ConstraintSettings, DPOConfig
from alignkit.data.collate import collate_pairs
from alignkit.data.prepare import prepare_preference_data
from alignkit.losses.constraints import (
    check_constraints,
    constraint_losses,
    flagged_reward_penalty,
    implicit_rewards,
    nll_anchor,
)
from alignkit.models.load import load_causal_lm, load_tokenizer

GOOD = ["happy", "kind", "sunny", "warm", "smiled", "love"]
BAD = ["sad", "angry", "cold", "cried", "dark", "lost"]


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def pairs(n: int, seed: int = 0, **extra) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Tom went out {i}. It was",
            "chosen": " " + " ".join(rng.choices(GOOD, k=3)) + ".",
            "rejected": " " + " ".join(rng.choices(BAD, k=3)) + ".",
            **{k: v[i] for k, v in extra.items()},
        }
        for i in range(n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, model, data, name, **overrides) -> DPOConfig:
    base = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / name),
        batch_size=4,
        max_steps=3,
        lr=3e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_length=48,
        max_prompt_length=32,
        save_steps=0,
        progress=False,
    )
    return DPOConfig(**{**base, **overrides})


@torch.no_grad()
def sequence_logps(model_dir, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-prob sums under the saved model, with the plain 2B-row layout."""
    model = load_causal_lm(str(model_dir), "float32").eval()
    out = dpo.pair_logps(model, collate_pairs(examples, pad_id=0), 1024)
    chosen, rejected = out["chosen"], out["rejected"]
    return chosen, rejected


# ---------------------------------------------------------------------------------------------
# the penalties by hand


def test_flagged_reward_penalty_by_hand():
    """r = (0.5, −0.2, 0.3), flagged (yes, yes, no), threshold 0.1.

    τ = 0.2: 0.2·softplus(0.4/0.2) = 0.2·log(1 + e²) = 0.425386; 0.2·softplus(−1.5) = 0.2·0.201413 = 0.040283; 0
             gradient σ((r − t)/τ): σ(2) = 0.880797, σ(−1.5) = 0.182426, 0
    τ = 0 (hinge): max(0, 0.4) = 0.4, max(0, −0.3) = 0, 0; gradient 1, 0, 0
    """
    flagged = torch.tensor([True, True, False])
    r = t(0.5, -0.2, 0.3).requires_grad_()
    smooth = flagged_reward_penalty(r, flagged, threshold=0.1, temperature=0.2)
    torch.testing.assert_close(
        smooth, t(0.2 * math.log1p(math.exp(2)), 0.2 * math.log1p(math.exp(-1.5)), 0.0)
    )
    assert smooth[0].item() == pytest.approx(0.425386, abs=1e-6) and smooth[1].item() == pytest.approx(
        0.040283, abs=1e-6
    )
    smooth.sum().backward()
    torch.testing.assert_close(r.grad, t(sigmoid(2.0), sigmoid(-1.5), 0.0))
    r.grad = None
    hinge = flagged_reward_penalty(r, flagged, threshold=0.1, temperature=0.0)
    torch.testing.assert_close(hinge, t(0.4, 0.0, 0.0))
    hinge.sum().backward()
    torch.testing.assert_close(r.grad, t(1.0, 0.0, 0.0))


def test_nll_anchor_implicit_rewards_and_the_weighted_sum_by_hand():
    """nll = −logp/|y|: (−6/3, −3/2) → (2, 1.5). Rewards β·(logp − ref) = 0.5·((−6 + 7), (−3 + 2)) = (0.5, −0.5);
    per token (length-normalised): 0.5·(1/3, −1/2). Two constraints, flagged_reward (weight 2, t = 0, hinge;
    the chosen of pair 0 and the rejected of pair 1 flagged) and nll_anchor (weight 0.5):
    pair 0: 2·max(0, 0.5) + 0.5·2 = 2.0;  pair 1: 2·max(0, r_l = 0.25) + 0.5·1.5 = 1.25 (r_l = 0.5·(−4 + 4.5))."""
    chosen, lengths = t(-6.0, -3.0), t(3.0, 2.0)
    torch.testing.assert_close(nll_anchor(chosen, lengths), t(2.0, 1.5))
    rewards = implicit_rewards(chosen, t(-7.0, -2.0), lengths, beta=0.5)
    torch.testing.assert_close(rewards, t(0.5, -0.5))
    normalised = implicit_rewards(chosen, t(-7.0, -2.0), lengths, beta=0.5, length_normalised=True)
    torch.testing.assert_close(normalised, t(0.5 / 3, -0.25))
    assert implicit_rewards(chosen, None, lengths, beta=0.5).tolist() == [-3.0, -1.5]  # reference-free
    constraints = [
        ConstraintSettings(type="flagged_reward", weight=2.0, temperature=0.0),
        ConstraintSettings(type="nll_anchor", weight=0.5),
    ]
    flagged = torch.tensor([[[True, False]], [[False, True]]])  # (B, F=1, 2)
    total, metrics = constraint_losses(
        constraints,
        chosen_rewards=rewards,
        rejected_rewards=0.5 * (t(-3.0, -4.0) - t(-3.0, -4.5)),  # (0, 0.25)
        chosen_logps=chosen,
        chosen_lengths=lengths,
        flagged=flagged,
    )
    torch.testing.assert_close(total, t(2.0, 1.25))
    assert metrics == {
        "constraint/flagged_reward": pytest.approx(0.375),
        "constraint/nll_anchor": pytest.approx(1.75),
    }
    twice, metrics = constraint_losses(
        [constraints[1], constraints[1]],
        chosen_rewards=rewards,
        rejected_rewards=rewards,
        chosen_logps=chosen,
        chosen_lengths=lengths,
    )
    torch.testing.assert_close(twice, t(2.0, 1.5))
    assert set(metrics) == {"constraint/nll_anchor_1", "constraint/nll_anchor_2"}


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"type": "saftey"}, "constraints[0]: type 'saftey' is not one of flagged_reward, nll_anchor"),
        ({"type": "nll_anchor", "threshold": 1.0}, "threshold=1.0 is not used by a nll_anchor constraint"),
        ({"type": "flagged_reward", "cutoff": 0.5}, "cutoff and flag_when apply to a scorer's scores"),
        ({"type": "flagged_reward", "weight": -1.0}, "weight and temperature must be >= 0"),
        ({"type": "flagged_reward", "flag_when": "over"}, "flag_when='over' is not 'below' or 'above'"),
    ],
)
def test_bad_constraint_settings_are_errors(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_constraints([ConstraintSettings(**settings)], ConstraintSettings())


# ---------------------------------------------------------------------------------------------
# stepwise DPO


def test_stepwise_dpo_stage_two_is_measured_against_stage_one(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    refs = {}  # stage -> the training examples with their precomputed reference log-probs
    real = dpo.attach_precomputed_reference

    def spy(cfg, model, splits, *args, **kwargs):
        real(cfg, model, splits, *args, **kwargs)
        refs[int(Path(cfg.output_dir).name.split("-")[1])] = [dict(e) for e in splits["train"]]

    monkeypatch.setattr(dpo, "attach_precomputed_reference", spy)
    cfg = config(tmp_path, tiny_model_dir, data, "sdpo", stages=2)
    final = sdpo.train(cfg)
    root = tmp_path / "sdpo"
    assert final == root / "stage-2" / "final" and (root / "final").resolve() == final.resolve()
    # file order: stage 1 trains on lines 1-8, stage 2 on lines 9-16
    assert sorted(e["line"] for e in refs[1]) == list(range(1, 9))
    assert sorted(e["line"] for e in refs[2]) == list(range(9, 17))
    # each stage's reference is the model it started from: the initial one, then stage 1's final model
    for stage, model_dir in ((1, tiny_model_dir), (2, root / "stage-1" / "final")):
        chosen, rejected = sequence_logps(model_dir, refs[stage])
        torch.testing.assert_close(
            torch.tensor([e["ref_chosen"] for e in refs[stage]]), chosen, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor([e["ref_rejected"] for e in refs[stage]]), rejected, atol=1e-4, rtol=0
        )
    stage_2_config = (root / "stage-2" / "config.yaml").read_text()
    assert f"model: {root / 'stage-1' / 'final'}" in stage_2_config
    # and stage 2 moved on from stage 1
    one, two = (load_file(str(root / f"stage-{k}" / "final" / "model.safetensors")) for k in (1, 2))
    assert any(not torch.equal(one[name], two[name]) for name in one)
    first_step = [json.loads(line) for line in (root / "stage-2" / "metrics.jsonl").read_text().splitlines()][
        0
    ]
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = its reference at the start


def test_stepwise_dpo_resumes_in_the_stage_that_was_cut_short(tmp_path, tiny_model_dir, monkeypatch):
    """A crash in stage 2 before its first checkpoint: resume=true skips stage 1 and runs stage 2 again, to the
    metrics of an uninterrupted run."""
    import alignkit.training.loop as loop

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    whole = config(tmp_path, tiny_model_dir, data, "whole", stages=2, report=False)
    sdpo.train(whole)
    real_step, calls = loop.optimizer_step, []

    def crash_in_stage_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == whole_steps(tmp_path / "whole" / "stage-1") + 2:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", crash_in_stage_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sdpo.train(config(tmp_path, tiny_model_dir, data, "cut", stages=2, report=False))
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    trained = []
    real_train = dpo.train
    monkeypatch.setattr(
        dpo, "train", lambda cfg, **kw: trained.append(cfg.output_dir) or real_train(cfg, **kw)
    )
    sdpo.train(config(tmp_path, tiny_model_dir, data, "cut", stages=2, resume=True, report=False))
    assert trained == [str(tmp_path / "cut" / "stage-2")]

    def losses(run):
        lines = (tmp_path / run / "stage-2" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"train"' in x]

    assert losses("cut") == losses("whole")


def whole_steps(stage_dir) -> int:
    """Optimizer steps a finished stage ran (its last train line's step)."""
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max(r["step"] for r in lines if r.get("split") == "train")


def test_stepwise_settings_are_checked(tmp_path, capsys):
    args = ["dpo", f"model={tmp_path}/m", f"data={tmp_path}/d.jsonl", f"output_dir={tmp_path}/o"]
    assert main([*args, "stages=2", "lora.enabled=true"]) == 1
    assert "stages > 1 with LoRA needs lora.merge=true" in capsys.readouterr().err
    assert main([*args, "stages=0"]) == 2  # a range: refused when the config loads
    assert "'stages' must be >= 1, got 0" in capsys.readouterr().err
    assert main([*args, "stage=2"]) == 2  # the stage runner's own business, not a user setting
    assert "unknown config key 'stage'" in capsys.readouterr().err
    assert dpo.stage_examples(list(range(10)), 1, 3) == [0, 1, 2]
    assert dpo.stage_examples(list(range(10)), 2, 3) == [3, 4, 5, 6]
    assert dpo.stage_examples(list(range(10)), 3, 3) == [7, 8, 9]


# ---------------------------------------------------------------------------------------------
# constraints in training


def test_a_safety_constraint_lowers_the_implicit_reward_of_flagged_responses(tmp_path, tiny_model_dir):
    """The use case: a preference loss plus a safety constraint. A scorer (a regex reward source standing in
    for a safety classifier) flags chosen responses with 'love' or 'happy'; DPO alone raises every chosen
    response's implicit reward, flagged or not; with the constraint the flagged ones are held down."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    constraint = {
        "type": "flagged_reward",
        "weight": 10.0,
        "threshold": 0.0,
        "temperature": 0.0,
        "scorer": {"type": "regex", "pattern": "love|happy"},
        "flag_when": "above",
        "cutoff": 0.5,
    }
    runs = {
        "plain": config(tmp_path, tiny_model_dir, data, "plain", max_steps=6),
        "constrained": config(
            tmp_path, tiny_model_dir, data, "constrained", max_steps=6, constraints=[constraint]
        ),
    }
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples, _ = prepare_preference_data(runs["plain"], tokenizer, log=lambda *a: None)
    flagged = torch.tensor(
        [any(w in tokenizer.decode(e["chosen_ids"]) for w in ("love", "happy")) for e in examples]
    )
    assert 3 <= int(flagged.sum()) <= 13
    initial_chosen, initial_rejected = sequence_logps(tiny_model_dir, examples)
    reward, margin = {}, {}
    for name, cfg in runs.items():
        chosen, rejected = sequence_logps(dpo.train(cfg), examples)
        reward[name] = 0.1 * (chosen - initial_chosen)  # β·log-ratio of each chosen response
        margin[name] = reward[name] - 0.1 * (rejected - initial_rejected)
    assert reward["plain"][flagged].mean() > 0.1  # DPO raises the flagged chosen responses too
    assert reward["constrained"][flagged].mean() < 0.0  # held under the threshold, 0
    assert reward["constrained"][flagged].mean() < reward["plain"][flagged].mean() - 0.2
    assert (margin["constrained"][~flagged] > 0).all()  # and the preference is still learnt
    logged = [
        json.loads(line) for line in (tmp_path / "constrained" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged[0]["constraint/flagged_reward"] == 0.0  # r = 0 = threshold at step 1: the hinge is 0


def test_flag_columns_are_validated_and_must_feed_a_constraint(tmp_path, tiny_model_dir, capsys):
    flags = [True, False] * 4
    data = write_jsonl(tmp_path / "flags.jsonl", pairs(8, chosen_flagged=flags))
    args = [
        "dpo",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={tmp_path}/o",
        "batch_size=4",
        "max_steps=1",
    ]
    assert main(args) == 1
    assert (
        f"{data}:1: field 'chosen_flagged'/'rejected_flagged': no constraint reads the flag columns"
        in capsys.readouterr().err
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", pairs(8, rejected_flagged=["yes"] + [False] * 7))
    assert main([*args[:2], f"data={bad}", *args[3:], "constraints=[{type: flagged_reward}]"]) == 1
    assert (
        f"{bad}:1: field 'rejected_flagged': found string (expected true or false)" in capsys.readouterr().err
    )
    plain = write_jsonl(tmp_path / "plain.jsonl", pairs(8))
    assert main([*args[:2], f"data={plain}", *args[3:], "constraints=[{type: flagged_reward}]"]) == 1
    assert (
        "reads the rows' chosen_flagged / rejected_flagged columns, and no training row has one"
        in capsys.readouterr().err
    )
    # the column version: at step 1 (r = 0) a flagged chosen response costs τ·softplus(0) = 0.1·log 2
    out = tmp_path / "ok"
    ok = [*args[:2], f"data={data}", f"output_dir={out}", "batch_size=8", "max_steps=1", "progress=false"]
    assert main([*ok, "constraints=[{type: flagged_reward, weight: 3.0}]"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["constraint/flagged_reward"] == pytest.approx(
        0.5 * 0.1 * math.log(2), abs=1e-6
    )  # half flagged
    assert first["loss"] == pytest.approx(math.log(2) + 3.0 * 0.5 * 0.1 * math.log(2), abs=1e-5)
