"""Every registered objective trains the tiny model through the CLI; settings an objective does not use are
errors; the margin column end to end; reference-free objectives never touch a reference; bco_pair's running
reward mean δ survives a checkpoint exactly."""

import json
import math
import random

import pytest
import torch

import alignkit.models.reference
import alignkit.training.order
from alignkit.algorithms import dpo
from alignkit.cli import main
from alignkit.config.preference import DPOConfig
from alignkit.losses import LOSSES
from alignkit.training.loop import RunInterrupted
from tests.conftest import ctrl_c

GOOD = ["happy", "kind", "sunny", "warm", "smiled", "love"]
BAD = ["sad", "angry", "cold", "cried", "dark", "lost"]


def pairs(n: int, seed: int, **extra) -> list[dict]:
    """Pairs whose chosen completion uses 'good' words and the rejected one 'bad' words."""
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


def train_metrics(output_dir) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["split"] == "train"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """8 training pairs and one cache folder, so the rows are tokenised and the reference run once."""
    root = tmp_path_factory.mktemp("objectives")
    return {"data": write_jsonl(root / "pairs.jsonl", pairs(8, seed=0)), "cache": str(root / "cache")}


def cli_args(model, data, out, *extra) -> list[str]:
    """One optimizer step per batch of all 8 rows: each step sees the same rows, so the loss must fall."""
    return [
        "dpo",
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "batch_size=8",
        "max_steps=4",
        "max_length=48",
        "max_prompt_length=32",
        "lr=3e-3",
        "warmup_ratio=0",
        "lr_scheduler=constant",
        "save_steps=0",
        "progress=false",
        *extra,
    ]


# Non-default settings where an objective has its own (the rest run on the defaults).
SETTINGS = {"robust": ["label_smoothing=0.2"], "simpo": ["beta=2.0", "gamma=1.0"], "rpo": ["nll_weight=0.5"]}


# Step-1 losses at h = 0 (β = 0.1): f(0) of each objective.
FIRST_STEP = {
    "sigmoid": math.log(2),  # ℓ(0)
    "robust": math.log(2),  # ℓ(0) − ε·0/(1 − 2ε)
    "hinge": 1.0,  # max(0, 1 − 0)
    "ipo": 25.0,  # (0 − 1/(2·0.1))²
    "gpo_logistic": math.log(2),
    "gpo_hinge": 1.0,
    "gpo_squared": 1.0,  # (0 − 1)²
    "gpo_exponential": 1.0,  # e^0
    "gpo_truncated_quadratic": 1.0,
    "gpo_savage": 0.25,  # σ(0)²
    "bco_pair": 2 * math.log(2),  # δ = 0: ℓ(0) + ℓ(0)
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_objective_lowers_its_loss_through_the_cli(tmp_path, tiny_model_dir, shared, name):
    out = tmp_path / name
    extra = [f"loss={name}", f"cache_dir={shared['cache']}", *SETTINGS.get(name, [])]
    args = cli_args(tiny_model_dir, shared["data"], out, *extra)
    assert main(args) == 0
    losses = [m["loss"] for m in train_metrics(out)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert (losses[-1] + losses[-2]) / 2 < losses[0], losses
    if name in FIRST_STEP:  # policy = reference at step 1: h = 0
        assert losses[0] == pytest.approx(FIRST_STEP[name], abs=1e-5)


@pytest.mark.parametrize(
    "setting, loss, message",
    [
        ("label_smoothing=0.1", "ipo", "label_smoothing=0.1 is not used by loss 'ipo' (it uses beta)"),
        ("gamma=1.0", "sigmoid", "gamma=1.0 is not used by loss 'sigmoid' (it uses beta, label_smoothing)"),
        ("nll_weight=0.5", "simpo", "nll_weight=0.5 is not used by loss 'simpo'"),
        (
            "reference.mode=copy",
            "orpo",
            "reference=ReferenceSettings(mode='copy', model=None) is not used by loss 'orpo' (it uses beta and no reference)",
        ),
        (
            "label_smoothing=0.5",
            "robust",
            "label_smoothing=0.5 is not valid (expected a label-flip probability",
        ),
    ],
)
def test_a_setting_the_objective_does_not_use_is_an_error(tmp_path, capsys, setting, loss, message):
    # Fails before any data or model is read: the model path does not even exist.
    assert (
        main(
            cli_args(
                tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "o", f"loss={loss}", setting
            )
        )
        == 1
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_margin_column_shifts_the_dpo_logit_end_to_end(tmp_path, tiny_model_dir, shared):
    margins = [0.0, 1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5]
    data = write_jsonl(tmp_path / "margins.jsonl", pairs(8, seed=0, margin=margins))
    out = tmp_path / "odpo"
    assert main(cli_args(tiny_model_dir, data, out, f"cache_dir={shared['cache']}")) == 0
    first = train_metrics(out)[0]
    # Step 1: policy = reference, so h = 0 and each row's loss is −log σ(0 − m) = log(1 + e^m).
    expected = sum(math.log1p(math.exp(m)) for m in margins) / len(margins)
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    assert first["rewards/margins"] == 0.0  # the margin shifts the logit, not the implicit rewards


def test_margin_column_with_an_objective_that_ignores_it_is_an_error(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", pairs(8, seed=0, margin=[None, None, 1.0] + [None] * 5))
    assert main(cli_args(tiny_model_dir, data, tmp_path / "o", "loss=ipo")) == 1
    err = capsys.readouterr().err
    assert (
        f"{data}:3: field 'margin': loss 'ipo' does not use per-row 'margin' values (1 rows have one)" in err
    )
    assert "use loss=sigmoid" in err


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if not s.needs_reference))
def test_reference_free_objectives_never_compute_or_load_a_reference(
    tmp_path, tiny_model_dir, shared, monkeypatch, name
):
    import alignkit.models.load

    loaded = []
    real_load = alignkit.models.load.load_causal_lm

    def counting_load(*a, **k):
        loaded.append(a[0])
        return real_load(*a, **k)

    # The policy loads through models.load_policy, a reference through reference.py's import: count both.
    monkeypatch.setattr(alignkit.models.load, "load_causal_lm", counting_load)
    monkeypatch.setattr(alignkit.models.reference, "load_causal_lm", counting_load)

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference-free objective computed reference log-probs")

    monkeypatch.setattr(dpo, "attach_precomputed_reference", forbidden)
    monkeypatch.setattr(alignkit.models.reference, "reference_logps", forbidden)
    cache = tmp_path / "cache"
    out = tmp_path / "o"
    assert main(cli_args(tiny_model_dir, shared["data"], out, f"loss={name}", f"cache_dir={cache}")) == 0
    assert loaded == [str(tiny_model_dir)]  # the policy only
    assert not list(cache.glob("reference-*"))
    assert len(train_metrics(out)) == 4


def test_bco_pair_running_mean_is_checkpointed_and_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(16, seed=2))

    def config(out):
        return DPOConfig(
            model=str(tiny_model_dir),
            data=data,
            output_dir=str(out),
            loss="bco_pair",
            batch_size=4,
            max_steps=5,
            lr=3e-3,
            warmup_ratio=0.0,
            max_length=48,
            max_prompt_length=32,
            save_steps=0,
            progress=False,
        )

    full = config(tmp_path / "a")
    dpo.train(full)
    expected = [(m["loss"], m["delta"]) for m in train_metrics(tmp_path / "a")]
    assert expected[0][1] == 0.0 and expected[-1][1] != 0.0  # δ starts at 0 and tracks the rewards

    cut = config(tmp_path / "b")
    original = alignkit.training.order.DataOrder.micro_batches

    def interrupt_in_step_4(self, step):
        if step == 3:  # (0-based)
            ctrl_c()
        return original(self, step)

    monkeypatch.setattr(alignkit.training.order.DataOrder, "micro_batches", interrupt_in_step_4)
    with pytest.raises(RunInterrupted):
        dpo.train(cut)
    state = torch.load(tmp_path / "b" / "checkpoints" / "checkpoint-4" / "loop_state.pt", weights_only=True)
    assert state["count"] == 4 * 2 * 4  # 4 steps of 4 pairs, chosen and rejected rewards
    monkeypatch.setattr(alignkit.training.order.DataOrder, "micro_batches", original)
    cut.resume = True
    dpo.train(cut)
    assert [(m["loss"], m["delta"]) for m in train_metrics(tmp_path / "b")] == expected


def test_paired_loss_and_its_running_delta_on_tensors():
    """dpo.paired_loss is the objective on tensors: sigmoid DPO by hand, h = (−1 − −2) − (−3 − −2) = 2,
    loss = −log σ(β·h) = log(1 + e^−0.2) at β = 0.1; and PairedObjective moves bco_pair's δ by the mean
    of the batch's implicit rewards, only in training mode."""
    from alignkit.config.preference import DPOConfig
    from alignkit.losses import get_loss

    policy = {
        "chosen": torch.tensor([-1.0]),
        "rejected": torch.tensor([-3.0]),
        "n_chosen": torch.tensor([2]),
        "n_rejected": torch.tensor([2]),
    }
    ref = {"chosen": torch.tensor([-2.0]), "rejected": torch.tensor([-2.0])}
    batch = {"preference": torch.tensor([1.0])}
    cfg = DPOConfig(beta=0.1)
    loss, metrics, _ = dpo.paired_loss(cfg, get_loss("sigmoid"), policy, ref, batch=batch)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.2, rel=1e-6)
    assert float(metrics["rewards/accuracies"]) == 1.0

    moved = {**policy, "rejected": torch.tensor([-2.5])}

    class Model(torch.nn.Module):  # stands in for the prepared policy: returns the batch function's output
        def forward(self, batch):
            return moved

    cfg = DPOConfig(beta=0.1, loss="bco_pair")
    reference = alignkit.models.reference.Reference("precomputed", ("chosen", "rejected"))
    objective = dpo.PairedObjective(cfg, get_loss("bco_pair"), reference)
    batch = {**batch, "ref_chosen": ref["chosen"], "ref_rejected": ref["rejected"]}
    model = Model().eval()
    objective(model, batch)
    assert objective.reward_mean.count == 0  # evaluation does not move δ
    objective(model.train(), batch)
    # rewards β·(−1 − −2) = 0.1 and β·(−2.5 − −2) = −0.05: their mean is 0.025
    assert objective.reward_mean.count == 2 and objective.reward_mean.mean == pytest.approx(0.025, rel=1e-6)
