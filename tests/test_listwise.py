"""Listwise objectives: equal to sigmoid DPO on pairs, 3-item numbers by hand, masks for lists of unequal
length; list rows and their errors; `alignkit listwise` runs that learn a ranking."""

import json
import math
import random

import pytest
import torch

from alignkit.cli import main
from alignkit.data.collate import collate_lists
from alignkit.data.load import load_listwise_rows
from alignkit.data.readers import DataError
from alignkit.losses import LISTWISE_LOSSES, preference_loss
from alignkit.losses.listwise import listwise_soft_loss, plackett_luce_loss, soft_targets

GOOD = ["happy", "kind", "sunny", "warm", "smiled", "love"]
MID = ["tall", "blue", "round", "quiet", "busy", "old"]
BAD = ["sad", "angry", "cold", "cried", "dark", "lost"]


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


# Two pairs: policy and reference log-prob sums of (chosen, rejected).
POLICY = t([-1.0, -3.0], [-4.0, -2.5])
REFERENCE = t([-2.0, -2.0], [-3.0, -2.0])
FULL = torch.ones(2, 2, dtype=torch.bool)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_two_responses_with_a_one_hot_target_or_an_order_are_sigmoid_dpo(beta):
    dpo = preference_loss(
        "sigmoid", POLICY[:, 0], POLICY[:, 1], REFERENCE[:, 0], ref_rejected_logps=REFERENCE[:, 1], beta=beta
    ).losses
    one_hot = t([1.0, 0.0], [1.0, 0.0])
    soft = listwise_soft_loss(POLICY, REFERENCE, FULL, target=one_hot, beta=beta)
    order = torch.tensor([[0, 1], [0, 1]])
    pl = plackett_luce_loss(POLICY, REFERENCE, FULL, order=order, beta=beta)
    torch.testing.assert_close(soft.losses, dpo, rtol=0, atol=1e-12)
    torch.testing.assert_close(pl.losses, dpo, rtol=0, atol=1e-12)
    # a soft target (p, 1 − p) is DPO with the soft label p
    p = t([0.7, 0.3], [0.4, 0.6])
    soft_label = preference_loss(
        "sigmoid",
        POLICY[:, 0],
        POLICY[:, 1],
        REFERENCE[:, 0],
        ref_rejected_logps=REFERENCE[:, 1],
        beta=beta,
        preference=p[:, 0],
    ).losses
    torch.testing.assert_close(
        listwise_soft_loss(POLICY, REFERENCE, FULL, target=p, beta=beta).losses, soft_label
    )
    # and the gradient matches DPO's too
    a = POLICY.clone().requires_grad_()
    b = POLICY.clone().requires_grad_()
    listwise_soft_loss(a, REFERENCE, FULL, target=one_hot, beta=beta).losses.sum().backward()
    preference_loss(
        "sigmoid", b[:, 0], b[:, 1], REFERENCE[:, 0], ref_rejected_logps=REFERENCE[:, 1], beta=beta
    ).losses.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


# Three responses; policy − reference log-ratios (2, 0, −1), β = 0.5: r = (1, 0, −0.5).
# log Σ e^r = log(e + 1 + e^−0.5) = log 4.324812 = 1.464369
THREE = dict(
    logps=t([-1.0, -3.0, -5.0]), ref_logps=t([-3.0, -3.0, -4.0]), mask=torch.ones(1, 3, dtype=torch.bool)
)


def test_soft_listwise_loss_on_three_responses_by_hand():
    """target p = softmax(scores (1, 0, −1) / τ); loss = −Σ p_k (r_k − log Σ e^r).

    τ = 1: p = (e, 1, e^−1) / (e + 1 + e^−1) = (0.665241, 0.244728, 0.090031);
           loss = 0.665241·0.464369 + 0.244728·1.464369 + 0.090031·1.964369 = 0.844143
    τ = 0.5: p = (e², 1, e^−2) / (e² + 1 + e^−2) = (0.866813, 0.117310, 0.015876);
           loss = 0.866813·0.464369 + 0.117310·1.464369 + 0.015876·1.964369 = 0.605494
    """
    scores = t([1.0, 0.0, -1.0])
    log_z = lse(1.0, 0.0, -0.5)
    for tau, expected in ((1.0, 0.844143), (0.5, 0.605494)):
        p = soft_targets(scores, THREE["mask"], tau)
        z = sum(math.exp(s / tau) for s in (1.0, 0.0, -1.0))
        torch.testing.assert_close(p, t([math.exp(1 / tau) / z, 1 / z, math.exp(-1 / tau) / z]))
        exact = -sum(pk * (r - log_z) for pk, r in zip(p[0].tolist(), (1.0, 0.0, -0.5)))
        out = listwise_soft_loss(**THREE, target=p, beta=0.5)
        assert out.losses.item() == pytest.approx(exact, abs=1e-12)
        assert out.losses.item() == pytest.approx(expected, abs=1e-6)
        torch.testing.assert_close(out.rewards, t([1.0, 0.0, -0.5]))
    # policy = reference: softmax(r) uniform, so the loss is the cross-entropy to uniform, log 3
    same = listwise_soft_loss(THREE["logps"], THREE["logps"], THREE["mask"], target=p, beta=0.5)
    assert same.losses.item() == pytest.approx(math.log(3))


def test_plackett_luce_on_three_responses_by_hand():
    """loss = −Σ_{j<K} (r_σ(j) − log Σ_{l≥j} e^{r_σ(l)}), r = (1, 0, −0.5).

    σ = (0, 1, 2): (1.464369 − 1) + (log(1 + e^−0.5) − 0) = 0.464369 + 0.474077 = 0.938446
    σ = (2, 0, 1): (1.464369 + 0.5) + (log(e + 1) − 1) = 1.964369 + 0.313262 = 2.277630
    """
    for order, expected in (([0, 1, 2], 0.938446), ([2, 0, 1], 2.277630)):
        out = plackett_luce_loss(**THREE, order=torch.tensor([order]), beta=0.5)
        r = [(1.0, 0.0, -0.5)[k] for k in order]
        exact = (lse(*r) - r[0]) + (lse(*r[1:]) - r[1])
        assert out.losses.item() == pytest.approx(exact, abs=1e-12)
        assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    # policy = reference: every ranking has probability 1/3!
    same = plackett_luce_loss(THREE["logps"], THREE["logps"], THREE["mask"], order=torch.tensor([[1, 2, 0]]))
    assert same.losses.item() == pytest.approx(math.log(6))


def test_lists_of_unequal_length_in_one_batch_equal_each_list_alone():
    logps = t([-1.0, -3.0, -5.0], [-4.0, -2.5, 0.0])  # the second list has two responses
    refs = t([-3.0, -3.0, -4.0], [-3.0, -2.0, 0.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    target = soft_targets(t([1.0, 0.0, -1.0], [0.0, 2.0, 0.0]), mask)
    assert target[1, 2] == 0.0
    order = torch.tensor([[2, 0, 1], [1, 0, 2]])
    a = logps.clone().requires_grad_()
    batch = (
        listwise_soft_loss(a, refs, mask, target=target).losses
        + plackett_luce_loss(a, refs, mask, order=order).losses
    )
    batch.sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad[1, 2] == 0.0  # an empty slot gets no gradient
    for b, k in ((0, 3), (1, 2)):
        one = [x[b : b + 1, :k] for x in (logps, refs, mask)]
        alone = (
            listwise_soft_loss(*one, target=target[b : b + 1, :k]).losses
            + plackett_luce_loss(*one, order=order[b : b + 1, :k]).losses
        )
        assert batch[b].item() == pytest.approx(alone.item(), abs=1e-12)


def test_collate_lists_puts_every_response_in_one_batch():
    examples = [
        {"prompt_ids": [1, 5], "responses_ids": [[7, 2], [8, 8, 2], [9, 2]]},
        {"prompt_ids": [1, 6], "responses_ids": [[3, 2], [4, 2]]},
    ]
    batch = collate_lists(examples, pad_id=0)
    assert batch["input_ids"].shape == (5, 5)
    assert batch["list_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["slot"].tolist() == [0, 1, 2, 3, 4]  # b·K + k with K = 3
    assert batch["input_ids"][4].tolist() == [1, 6, 4, 2, 0]
    assert batch["completion_mask"][4].tolist() == [0, 0, 1, 1, 0]


# ---------------------------------------------------------------------------------------------
# rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_list_rows_and_their_errors(tmp_path):
    good = write_jsonl(
        tmp_path / "good.jsonl",
        [
            {"prompt": "Hi.", "responses": [" a", " b", " c"], "scores": [1, 0, 2]},
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "responses": [
                    {"role": "assistant", "content": "Yo"},
                    [{"role": "assistant", "content": "Hey"}],
                ],
                "probs": [0.25, 0.75],
            },
            {"prompt": "Hi.", "responses": [" a", " b"], "ranking": [1, 0]},
        ],
    )
    rows = load_listwise_rows(good)
    assert rows[0].responses == [" a", " b", " c"] and rows[0].scores == [1.0, 0.0, 2.0]
    assert rows[1].prompt == "\n\nHuman: Hi\n\nAssistant:" and rows[1].responses == [" Yo", " Hey"]
    assert rows[1].probs == [0.25, 0.75] and rows[2].ranking == [1, 0]
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "p", "responses": [" a"], "scores": [1]},
            {"prompt": "p", "responses": [" a", " b"], "scores": [1, 2, 3]},
            {"prompt": "p", "responses": [" a", " b"], "probs": [0.5, 0.6]},
            {"prompt": "p", "responses": [" a", " b"], "ranking": [1, 1]},
            {"prompt": "p", "responses": [" a", " b"]},
            {"prompt": "p", "responses": [" a", " b"], "scores": [1, 2], "probs": [0.5, 0.5]},
            {"prompt": "p", "responses": [" a", 3], "scores": [1, float("nan")]},
        ],
    )
    with pytest.raises(DataError) as err:
        load_listwise_rows(bad)
    text = str(err.value)
    for expected in (
        f"{bad}:1: field 'responses': found 1 response(s) (expected a list of at least two responses)",
        f"{bad}:2: field 'scores': 3 values for 2 responses",
        f"{bad}:3: field 'probs': sums to 1.1 (expected a probability per response, summing to 1)",
        f"{bad}:4: field 'ranking': [1, 1] is not a permutation of 0..1",
        f"{bad}:5: found none (expected exactly one of scores, probs, ranking)",
        f"{bad}:6: field 'probs': found scores and probs",
        f"{bad}:7: field 'scores': element 1 is nan",
        f"{bad}:7: field 'responses[1]': found number",
    ):
        assert expected in text


# ---------------------------------------------------------------------------------------------
# training


def ranked_lists(n: int, seed: int = 0) -> list[dict]:
    """Three responses of 'middling', 'bad' and 'good' words, given as a ranking, scores or probs in turn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        responses = [" " + " ".join(rng.choices(words, k=3)) + "." for words in (MID, BAD, GOOD)]
        target = [{"ranking": [2, 0, 1]}, {"scores": [0.0, -1.0, 1.0]}, {"probs": [0.2, 0.1, 0.7]}][i % 3]
        rows.append({"prompt": f"Tom went out {i}. It was", "responses": responses, **target})
    return rows


def cli_args(model, data, out, *extra) -> list[str]:
    return [
        "listwise",
        f"model={model}",
        f"data={data}",
        f"eval_data={data}",
        f"output_dir={out}",
        "batch_size=4",
        "max_steps=10",
        "eval_steps=10",
        "max_length=48",
        "max_prompt_length=32",
        "lr=3e-3",
        "warmup_ratio=0",
        "lr_scheduler=constant",
        "save_steps=0",
        "progress=false",
        *extra,
    ]


def metrics(output_dir, split="train") -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["split"] == split]


@pytest.mark.parametrize("name", sorted(LISTWISE_LOSSES))
def test_listwise_training_learns_the_ranking(tmp_path, tiny_model_dir, name):
    rows = ranked_lists(16)
    if name == "soft":  # a soft target needs scores or probs: give the ranked rows scores
        rows = [
            {k: v for k, v in r.items() if k != "ranking"}
            | ({"scores": [1.0, 0.0, 2.0]} if "ranking" in r else {})
            for r in rows
        ]
    data = write_jsonl(tmp_path / "lists.jsonl", rows)
    out = tmp_path / name
    assert main(cli_args(tiny_model_dir, data, out, f"loss={name}")) == 0
    train = metrics(out)
    # policy = reference at step 1: softmax of the rewards is uniform
    first = {"soft": math.log(3), "plackett_luce": math.log(6)}[name]
    assert train[0]["loss"] == pytest.approx(first, abs=1e-5)
    assert (train[-1]["loss"] + train[-2]["loss"]) / 2 < train[0]["loss"]
    final = metrics(out, "eval")[-1]
    assert final["rewards/accuracies"] >= 0.9  # the 'good' response has the highest reward
    assert final["rewards/margins"] > 0.5


def test_targets_a_loss_cannot_use_are_errors(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "lists.jsonl", ranked_lists(6))
    assert main(cli_args(tiny_model_dir, data, tmp_path / "a", "loss=soft")) == 1
    assert f"{data}:1: field 'ranking': loss 'soft' needs scores or probs" in capsys.readouterr().err
    tied = write_jsonl(
        tmp_path / "tied.jsonl", [{"prompt": "p", "responses": [" a", " b"], "scores": [1, 1]}] * 4
    )
    assert main(cli_args(tiny_model_dir, tied, tmp_path / "b", "loss=plackett_luce")) == 1
    assert f"{tied}:1: field 'scores': [1.0, 1.0] has ties" in capsys.readouterr().err
    assert main(cli_args(tiny_model_dir, tied, tmp_path / "c", "loss=plackett_luce", "temperature=0.5")) == 1
    assert "temperature=0.5 is not used by loss 'plackett_luce'" in capsys.readouterr().err


def test_precomputed_reference_equals_the_on_the_fly_one_for_lists_of_unequal_length(
    tmp_path, tiny_model_dir
):
    rows = ranked_lists(12)
    for r in rows[::2]:  # every other list loses its last response: lists of 2 and 3 share batches
        r["responses"] = r["responses"][:2]
        r.pop("ranking", None), r.pop("probs", None)
        r["scores"] = [1.0, 0.0]
    data = write_jsonl(tmp_path / "lists.jsonl", rows)
    losses = {}
    for mode in ("precomputed", "copy"):
        out = tmp_path / mode
        assert (
            main(
                cli_args(
                    tiny_model_dir, data, out, "loss=plackett_luce", f"reference.mode={mode}", "max_steps=4"
                )
            )
            == 0
        )
        losses[mode] = [m["loss"] for m in metrics(out)]
    assert losses["precomputed"] == pytest.approx(losses["copy"], abs=1e-5)
    assert losses["copy"][-1] != losses["copy"][0]
