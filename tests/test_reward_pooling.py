"""Reward models that pool as their backbone was trained (`pooling`), and ensembles of heads (`ensemble`):
the pooling arithmetic by hand, what `auto` reads from a sentence-transformers folder, a mean-pooled model
scoring the same through alignkit, plain transformers and by hand, and an ensemble's mean and std."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from alignkit.algorithms.reward_model import (
    bootstrap_weights,
    resolve_pooling,
    reward_loss,
    seed_members,
    train,
)
from alignkit.cli import main
from alignkit.config.load import ConfigError
from alignkit.models.load import load_tokenizer
from alignkit.models.modeling_reward import pool
from alignkit.models.reward import load_reward_model
from alignkit.rewards.compose import RewardSet
from alignkit.rewards.registry import build_reward
from tests.conftest import TINYSTORIES
from tests.test_reward_model import (  # noqa: F401 (bert_dir: a fixture)
    bert_dir,
    last_eval,
    sentiment_rows,
    small_run,
    write_jsonl,
)


def write_st_pooling(path, **modes) -> None:
    """A sentence-transformers modules.json naming a Pooling module whose config sets `modes`."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))


@pytest.fixture(scope="module")
def st_bert(bert_dir, tmp_path_factory):  # noqa: F811
    """The tiny BERT as a sentence-transformers folder trained with mean pooling."""
    path = tmp_path_factory.mktemp("st-bert") / "model"
    shutil.copytree(bert_dir, path)
    write_st_pooling(path, pooling_mode_mean_tokens=True, pooling_mode_cls_token=False)
    return path


def test_pool_by_hand():
    """Token states 1..4 (one feature), right-padded [1 1 1 0] and left-padded [0 1 1 1]:
    mean (1+2+3)/3 = 2 and (2+3+4)/3 = 3; first real token 1 and 2; last real token 3 and 4."""
    hidden = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(2, 1).unsqueeze(-1)  # (2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert pool(hidden, mask, "mean").squeeze(-1).tolist() == [2.0, 3.0]
    assert pool(hidden, mask, "cls").squeeze(-1).tolist() == [1.0, 2.0]
    assert pool(hidden, mask, "last").squeeze(-1).tolist() == [3.0, 4.0]


def test_auto_pooling_reads_a_sentence_transformers_folder(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert resolve_pooling("auto", str(plain), encoder=True) == "cls"  # the stock classifier's
    assert resolve_pooling("auto", str(plain), encoder=False) == "last"
    assert resolve_pooling("auto", "org/hub-name", encoder=True) == "cls"
    for modes, expected in [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "last"),
    ]:
        write_st_pooling(plain, **modes)
        assert resolve_pooling("auto", str(plain), encoder=True) == expected
        assert resolve_pooling("last", str(plain), encoder=True) == "last"  # an explicit choice wins
    write_st_pooling(plain, pooling_mode_mean_tokens=True, pooling_mode_max_tokens=True)
    with pytest.raises(ConfigError, match="pooling_mode_max_tokens \\+ pooling_mode_mean_tokens is not one"):
        resolve_pooling("auto", str(plain), encoder=True)


def test_mean_pooled_model_scores_the_same_in_alignkit_transformers_and_by_hand(st_bert, tmp_path):
    """pooling=auto on a sentence-transformers folder trains a mean-pooled head (held-out accuracy > 0.9);
    the saved folder scores identically (1e-5) through the classifier source, through
    AutoModelForSequenceClassification with trust_remote_code (the folder's own copy of the class), and by
    hand from the backbone's stock class and the head's tensors (docs/reward_models.md); without
    trust_remote_code transformers refuses it rather than loading a stock class with [CLS] pooling."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    final = train(small_run(st_bert, tmp_path))
    logged = last_eval(tmp_path / "out")
    assert logged["rewards/accuracies"] > 0.9
    config = json.loads((final / "config.json").read_text())
    assert (config["model_type"], config["pooling"], config["id2label"]) == (
        "alignkit_pooled_reward",
        "mean",
        {"0": "reward"},
    )
    assert (final / "modeling_reward.py").is_file()

    rows = sentiment_rows(40, seed=1)
    prompts, chosen = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    source = build_reward({"type": "classifier", "model": str(final), "text": "{prompt}{response}"})
    scores = source.score(prompts, chosen)
    assert float(scores.mean()) == pytest.approx(logged["rewards/chosen"], abs=1e-5)  # as trained

    tokenizer = load_tokenizer(str(final))
    remote = AutoModelForSequenceClassification.from_pretrained(final, trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules")  # the folder's code, not alignkit's
    weights = load_file(final / "model.safetensors")
    backbone = AutoModel.from_config(AutoConfig.for_model(**config["backbone_config"])).eval()
    backbone.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")},
        strict=False,
    )
    with torch.no_grad():
        for p, c, expected in zip(prompts, chosen, scores):
            enc = tokenizer(p + c, return_tensors="pt")
            assert remote(**enc).logits.item() == pytest.approx(float(expected), abs=1e-5)
            states = backbone(**enc).last_hidden_state  # (1, T, H)
            by_hand = states.mean(1) @ weights["score.weight"].T + weights["score.bias"]
            assert by_hand.item() == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForSequenceClassification.from_pretrained(final)


def test_ensemble_loss_by_hand():
    """K = 2 heads, pairs 2 and 0 of a 3-pair bootstrap table w: the loss is the mean over pairs of
    mean_k w[i, k]·softplus(r_l - r_w) (head k's BT loss on its own resample); accuracy is the members'
    mean reward's; the uncertainty is the mean over the 4 responses of the std over the 2 members."""
    chosen = torch.tensor([[1.0, 3.0], [0.0, -2.0]])  # (B, K)
    rejected = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [5.0, 5.0], [2.0, 1.0]])
    batch = {"pair_index": torch.tensor([2, 0]), "preference": torch.ones(2)}
    loss, metrics = reward_loss(lambda b: {"chosen": chosen, "rejected": rejected}, batch, bootstrap=w)
    bt = F.softplus(rejected - chosen)  # (B, K)
    expected = ((2 * bt[0, 0] + 1 * bt[0, 1]) / 2 + (1 * bt[1, 0] + 0 * bt[1, 1]) / 2) / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(metrics["rewards/accuracies"]) == 0.5  # mean rewards: 2 > 0.25, -1 < 1
    assert float(metrics["rewards/member_accuracies"]) == 0.5
    # population std over 2 members = |a - b| / 2: (1, 3) -> 1, (0, -2) -> 1, (0.5, 0) -> 0.25, (1, 1) -> 0
    assert float(metrics["rewards/uncertainty"]) == pytest.approx((1 + 1 + 0.25 + 0) / 4)
    del batch["pair_index"]  # held-out pairs: every head weighs every pair once
    loss, _ = reward_loss(lambda b: {"chosen": chosen, "rejected": rejected}, batch, bootstrap=w)
    assert float(loss) == pytest.approx(float(bt.mean()), rel=1e-6)

    counts = bootstrap_weights(4000, 3, seed=7)
    assert torch.equal(counts, bootstrap_weights(4000, 3, seed=7)) and bootstrap_weights(10, 1, 0) is None
    assert float(counts.mean()) == pytest.approx(1.0, abs=0.05)  # Poisson(1): mean 1, P(0) = 1/e
    assert float((counts == 0).float().mean()) == pytest.approx(0.368, abs=0.02)
    assert not torch.equal(counts[:, 0], counts[:, 1])  # each member its own resample


def test_ensemble_members_are_seeded_and_scored_as_mean_and_std(bert_dir, tmp_path):  # noqa: F811
    """ensemble=3 on the stock BERT classifier ([CLS], 3 outputs): each head row is drawn from seed + k;
    trained and saved, the classifier source's reward is the mean of the members scored one by one (each
    as its own label), its uncertainty their std (by hand), uncertainty_weight subtracts λ·std, and
    the saved model gives the rewards the trained one logged."""
    model = load_reward_model(str(bert_dir), num_labels=3)
    head = seed_members(model, 3, seed=11)
    for k in range(3):
        expected = torch.randn(32, generator=torch.Generator().manual_seed(11 + k)) * 0.02
        torch.testing.assert_close(head.weight[k].detach(), expected)

    final = train(small_run(bert_dir, tmp_path, ensemble=3))
    logged = last_eval(tmp_path / "out")
    assert logged["rewards/accuracies"] > 0.9 and logged["rewards/uncertainty"] > 0
    saved = AutoModelForSequenceClassification.from_pretrained(final)
    assert type(saved).__name__ == "BertForSequenceClassification"
    assert saved.config.id2label == {0: "reward_0", 1: "reward_1", 2: "reward_2"}

    rows = sentiment_rows(40, seed=1)
    prompts, chosen = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    spec = {"type": "classifier", "model": str(final), "text": "{prompt}{response}"}
    members = torch.stack(
        [build_reward({**spec, "label": f"reward_{k}"}).score(prompts, chosen) for k in range(3)]
    )
    assert min((members[i] - members[j]).abs().max() for i, j in [(0, 1), (0, 2), (1, 2)]) > 1e-3
    mean, std = members.mean(0), ((members - members.mean(0)) ** 2).mean(0).sqrt()  # population std
    source = build_reward(spec)
    torch.testing.assert_close(source.score(prompts, chosen), mean, atol=1e-6, rtol=0)
    assert source.metrics()["uncertainty"].value == pytest.approx(float(std.mean()), abs=1e-6)
    assert source.metrics()["uncertainty"].rows == len(chosen)  # (a mean over the rows scored)
    assert float(mean.mean()) == pytest.approx(logged["rewards/chosen"], abs=1e-5)  # save/load round trip
    pessimistic = build_reward({**spec, "uncertainty_weight": 0.5}).score(prompts, chosen)
    torch.testing.assert_close(pessimistic, mean - 0.5 * std, atol=1e-6, rtol=0)

    rewards = RewardSet.from_specs(
        [{**spec, "name": "rm"}, {**spec, "name": "rm_std", "output": "uncertainty", "cost_threshold": 0.05}]
    )
    out = rewards(prompts, chosen)
    torch.testing.assert_close(out.scores["rm_std"], std, atol=1e-6, rtol=0)
    assert torch.equal(out.violated["rm_std"], std > 0.05)
    assert out.stats["rm/uncertainty"] == pytest.approx(float(std.mean()), abs=1e-6)


def test_pooling_and_ensemble_settings_that_cannot_apply_are_errors(bert_dir, tmp_path, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=0))
    base = ["reward", f"model={TINYSTORIES}", f"data={data}", f"output_dir={tmp_path / 'out'}"]
    assert main([*base, "pooling=mean", "share_prompt=true"]) == 1
    assert (
        "share_prompt reads each response's last token; pooling=mean reads others" in capsys.readouterr().err
    )
    assert main([*base, "ensemble=0"]) == 2
    assert "'ensemble' must be" in capsys.readouterr().err
    assert main([*base, "pooling=max"]) == 2
    assert "'pooling' must be one of auto, mean, cls, last, got 'max'" in capsys.readouterr().err
    single = tmp_path / "single"
    load_reward_model(str(bert_dir)).save_pretrained(single)
    load_tokenizer(str(bert_dir)).save_pretrained(single)
    with pytest.raises(ConfigError, match="need an ensemble reward model"):
        build_reward({"type": "classifier", "model": str(single), "output": "uncertainty"})
