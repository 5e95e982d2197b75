"""KTO and BCO (unpaired): losses and the KL reference point by hand, the mismatched pairs, rows, and
`alignkit kto` runs with batches of two rows."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from alignkit.algorithms import kto
from alignkit.cli import main
from alignkit.config.base import ReferenceSettings
from alignkit.config.preference import KTOConfig
from alignkit.data.collate import collate_unpaired, mismatched_partners
from alignkit.data.load import load_unpaired_rows
from alignkit.data.prepare import prepare_unpaired_data
from alignkit.data.readers import DataError
from alignkit.logprobs.completion import completion_logps
from alignkit.losses import UNPAIRED_LOSSES
from alignkit.losses.unpaired import bco_loss, kto_loss, kto_reference_point
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.training.order import data_order

GOOD = ["happy", "kind", "sunny", "warm", "smiled", "love"]
BAD = ["sad", "angry", "cold", "cried", "dark", "lost"]


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def unpaired_rows(n: int, seed: int = 0) -> list[dict]:
    """Even rows: a desirable completion of 'good' words; odd rows: an undesirable one of 'bad' words."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Tom went out {i}. It was",
            "completion": " " + " ".join(rng.choices(GOOD if i % 2 == 0 else BAD, k=3)) + ".",
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def metrics(output_dir, split="train") -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["split"] == split]


def cli_args(model, data, out, *extra) -> list[str]:
    return [
        "kto",
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "max_length=48",
        "max_prompt_length=32",
        "lr=3e-3",
        "warmup_ratio=0",
        "lr_scheduler=constant",
        "save_steps=0",
        "progress=false",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# the maths


@pytest.mark.parametrize(
    "beta, wd, wu, z0, expected",
    [
        # r = policy − ref = (+1, −1); row 0 desirable, row 1 undesirable.
        # β=0.5, z0=0.5: desirable 1 − σ(0.5·(1 − 0.5)) = 1 − σ(0.25) = 0.437823499
        #                undesirable 1 − σ(0.5·(0.5 + 1)) = 1 − σ(0.75) = 0.320821301
        (0.5, 1.0, 1.0, 0.5, (1 - sigmoid(0.25), 1 - sigmoid(0.75))),
        # β=0.1, z0=0, λ_D=1.33, λ_U=0.5: 1.33·(1 − σ(0.1)) = 0.631777681, 0.5·(1 − σ(0.1)) = 0.237510407
        (0.1, 1.33, 0.5, 0.0, (1.33 * (1 - sigmoid(0.1)), 0.5 * (1 - sigmoid(0.1)))),
    ],
)
def test_kto_loss_by_hand(beta, wd, wu, z0, expected):
    out = kto_loss(
        t(-1.0, -3.0),
        t(-2.0, -2.0),
        torch.tensor([True, False]),
        kl=z0,
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    torch.testing.assert_close(out.losses, t(*expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.rewards, t(beta, -beta))  # β·r
    assert out.metrics["kl"] == z0


def test_kto_gradient_raises_desirable_lowers_undesirable_and_never_flows_into_z0():
    policy = t(-2.0, -2.0).requires_grad_()
    policy_kl = t(-1.0, -1.5).requires_grad_()
    z0 = kto_reference_point(policy_kl, t(-2.0, -2.0))  # mean(1, 0.5) = 0.75
    assert z0.item() == 0.75 and not z0.requires_grad
    out = kto_loss(policy, t(-2.0, -2.0), torch.tensor([True, False]), kl=z0, beta=0.5)
    out.losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises the desirable, lowers the undesirable
    assert policy_kl.grad is None
    # At r = z0 each row's loss is λ_y / 2.
    at_z0 = kto_loss(t(-1.0), t(-2.0), torch.tensor([False]), kl=1.0, undesirable_weight=0.8)
    assert at_z0.losses.item() == pytest.approx(0.4)


def test_kto_reference_point_by_hand():
    """z0 = max(0, mean_i (log πθ − log πref)(y_j|x_i)); `reduce` averages over processes before the clamp."""
    # log-ratios (−1 + 3, −2 + 2.5) = (2, 0.5): mean 1.25
    assert kto_reference_point(t(-1.0, -2.0), t(-3.0, -2.5)).item() == 1.25
    # log-ratios (1, 0, −4): mean −1 -> clamped to 0
    assert kto_reference_point(t(-1.0, -2.0, -4.0), t(-2.0, -2.0, 0.0)).item() == 0.0
    # a second process whose batch mean is −3: (1.25 − 3) / 2 = −0.875 -> 0; one of 0.75: (1.25 + 0.75)/2 = 1
    assert kto_reference_point(t(-1.0, -2.0), t(-3.0, -2.5), lambda z: (z - 3.0) / 2).item() == 0.0
    assert kto_reference_point(t(-1.0, -2.0), t(-3.0, -2.5), lambda z: (z + 0.75) / 2).item() == 1.0


@pytest.mark.parametrize("beta, delta", [(0.5, 0.0), (0.1, 0.3)])
def test_bco_loss_by_hand(beta, delta):
    """r = β·(+1, −1): desirable −log σ(β − δ), undesirable −log σ(−(−β − δ)) = −log σ(β + δ)."""
    out = bco_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), delta=delta, beta=beta)
    expected = (-math.log(sigmoid(beta - delta)), -math.log(sigmoid(beta + delta)))
    torch.testing.assert_close(out.losses, t(*expected), rtol=0, atol=1e-12)
    weighted = bco_loss(
        t(-1.0, -3.0),
        t(-2.0, -2.0),
        torch.tensor([True, False]),
        delta=delta,
        beta=beta,
        undesirable_weight=2.0,
    )
    assert weighted.losses[1].item() == pytest.approx(2 * expected[1])


def test_mismatched_pairs_rotate_within_the_batch():
    assert mismatched_partners(2) == [1, 0]
    assert mismatched_partners(3) == [2, 0, 1]
    with pytest.raises(ValueError, match="at least 2 rows"):
        mismatched_partners(1)
    examples = [
        {"prompt_ids": [1, 5], "completion_ids": [7, 8, 2], "label": True},
        {"prompt_ids": [1, 6, 6], "completion_ids": [9, 2], "label": False},
    ]
    batch = collate_unpaired(examples, pad_id=0)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows == [[1, 5, 7, 8, 2], [1, 6, 6, 9, 2], [1, 5, 9, 2], [1, 6, 6, 7, 8, 2]]
    # the mismatched rows score the other row's completion after their own prompt
    assert batch["completion_mask"][2].tolist() == [0, 0, 1, 1, 0, 0]
    assert batch["completion_mask"][3].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["label"].tolist() == [True, False]
    assert collate_unpaired(examples, pad_id=0, mismatched=False)["input_ids"].shape[0] == 2
    # an evaluation chunk of one row joins the previous one
    assert kto.eval_batches(5, 2) == [[0, 1], [2, 3, 4]]
    assert kto.eval_batches(4, 2) == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------
# rows


def test_unpaired_rows_text_and_conversational_with_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(
        good,
        [
            {"prompt": "Hi.", "completion": " Hello!", "label": True},
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "completion": {"role": "assistant", "content": "Go away."},
                "label": False,
            },
        ],
    )
    rows = load_unpaired_rows(str(good))
    assert [(r.prompt, r.completion, r.label, r.line) for r in rows] == [
        ("Hi.", " Hello!", True, 1),
        ("\n\nHuman: Hi\n\nAssistant:", " Go away.", False, 2),
    ]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(
        bad,
        [
            {"prompt": "a", "completion": "b", "label": True},
            {"prompt": "a", "completion": "b"},
            {"prompt": "a", "completion": "b", "label": 1},
            {"prompt": "a", "completion": " ", "label": "yes"},
        ],
    )
    with pytest.raises(DataError) as err:
        load_unpaired_rows(str(bad))
    text = str(err.value)
    assert f"{bad}:2: field 'label': missing (expected true for a desirable completion" in text
    assert f"{bad}:3: field 'label': found number 1 (expected true" in text
    assert f"{bad}:4: field 'label': found string 'yes'" in text
    assert f"{bad}:4: field 'completion': empty completion" in text


# ---------------------------------------------------------------------------------------------
# training


def test_batch_size_one_is_an_error(tmp_path, capsys):
    assert main(cli_args(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o", "batch_size=1")) == 1
    assert "needs batch_size >= 2 (got 1)" in capsys.readouterr().err


def test_kl_estimate_in_a_batch_of_two_is_the_hand_computed_one(tmp_path, tiny_model_dir):
    """Step 1 of a run whose reference is other weights (so the log-ratios are not 0), batch_size 2:

    z0 = max(0, ½·[(log πθ − log πref)(y_b|x_a) + (log πθ − log πref)(y_a|x_b)]) for the step's rows a, b,
    and the logged loss is the mean of KTO's two row losses at that z0, all computed here one sequence at a
    time with the log-prob primitive."""
    from conftest import build_tiny_llama

    reference_dir = build_tiny_llama(tmp_path / "reference", seed=1)
    data = write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(8))
    cfg = KTOConfig(
        model=str(tiny_model_dir),
        reference=ReferenceSettings(model=str(reference_dir)),
        data=data,
        output_dir=str(tmp_path / "out"),
        batch_size=2,
        max_steps=1,
        beta=0.5,
        max_length=48,
        max_prompt_length=32,
        save_steps=0,
        progress=False,
        seed=5,
    )
    kto.train(cfg)
    logged = metrics(tmp_path / "out")[0]

    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples, _ = prepare_unpaired_data(cfg, tokenizer, log=lambda *a: None)
    one_process = SimpleNamespace(num_processes=1, process_index=0)
    ((a, b),) = data_order(cfg, len(examples), one_process).micro_batches(0)
    policy, reference = (load_causal_lm(str(p), "float32") for p in (tiny_model_dir, reference_dir))

    def logp(model, prompt_row, completion_row) -> float:
        p, c = examples[prompt_row]["prompt_ids"], examples[completion_row]["completion_ids"]
        ids = torch.tensor([p + c])
        mask = torch.tensor([[0] * len(p) + [1] * len(c)])
        with torch.no_grad():
            return completion_logps(model, ids, torch.ones_like(ids), mask).sum.item()

    def ratio(prompt_row, completion_row) -> float:
        return logp(policy, prompt_row, completion_row) - logp(reference, prompt_row, completion_row)

    z0 = max(0.0, (ratio(a, b) + ratio(b, a)) / 2)  # row a's prompt with row b's completion, and back
    assert z0 > 0  # these seeds give a positive estimate, so the clamp is not what is tested
    assert logged["kl"] == pytest.approx(z0, abs=1e-4)
    row_losses = []
    for i in (a, b):
        r = ratio(i, i)
        v = sigmoid(0.5 * (r - z0)) if examples[i]["label"] else sigmoid(0.5 * (z0 - r))
        row_losses.append(1.0 - v)
    assert logged["loss"] == pytest.approx(sum(row_losses) / 2, abs=1e-5)


def test_a_tiny_unpaired_run_separates_desirable_from_undesirable(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(16))
    out = tmp_path / "out"
    args = cli_args(
        tiny_model_dir, data, out, f"eval_data={data}", "batch_size=2", "max_steps=16", "eval_steps=16"
    )
    assert main(args) == 0
    train = metrics(out)
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: z0 = 0, every row 1 − σ(0)
    assert train[0]["kl"] == 0.0
    final = metrics(out, "eval")[-1]
    assert final["rewards/desirable"] > 0.3 and final["rewards/undesirable"] < -0.3
    assert final["rewards/margins"] > 0.8  # 0 before training
    assert final["frac/desirable"] + final["frac/undesirable"] == pytest.approx(1.0)  # shares of the rows


@pytest.mark.parametrize("name", sorted(UNPAIRED_LOSSES))
def test_every_unpaired_objective_lowers_its_loss_through_the_cli(tmp_path, tiny_model_dir, name):
    data = write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(8))
    out = tmp_path / name
    assert main(cli_args(tiny_model_dir, data, out, f"loss={name}", "batch_size=8", "max_steps=4")) == 0
    losses = [m["loss"] for m in metrics(out)]
    first = {"kto": 0.5, "bco": math.log(2)}[name]  # r = 0 (and z0 = δ = 0) at step 1
    assert losses[0] == pytest.approx(first, abs=1e-6)
    assert (losses[-1] + losses[-2]) / 2 < losses[0], losses


def test_precomputed_reference_of_the_mismatched_pairs_equals_the_on_the_fly_one(tmp_path, tiny_model_dir):
    """reference.mode=precomputed computes the reference log-probs of every mismatched pair the run's batches
    will form before training (from the seeded data order); reference.mode=copy computes them as it goes."""
    data = write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(12))
    runs = {}
    for mode in ("precomputed", "copy"):
        out = tmp_path / mode
        args = cli_args(
            tiny_model_dir, data, out, f"reference.mode={mode}", "batch_size=3", "epochs=2", "grad_accum=2"
        )
        assert main(args) == 0
        runs[mode] = [(m["loss"], m["kl"]) for m in metrics(out)]
    assert len(runs["copy"]) == 4 and any(kl > 0 for _, kl in runs["copy"])
    for (loss_a, kl_a), (loss_b, kl_b) in zip(runs["precomputed"], runs["copy"]):
        assert loss_a == pytest.approx(loss_b, abs=1e-5) and kl_a == pytest.approx(kl_b, abs=1e-5)
