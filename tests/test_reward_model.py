"""Bradley–Terry reward models: the loss by hand, the classifier's inputs, length-grouped batches, and
training a causal value-head model and an encoder that must learn, save, load back and score."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from alignkit.algorithms.reward_model import classifier_pairs, make_collate, pair_rewards
from alignkit.cli import main
from alignkit.config.supervised import RewardConfig
from alignkit.data.load import load_preference_rows
from alignkit.data.tokenize import tokenize_preference_rows
from alignkit.losses.reward import bradley_terry_loss
from alignkit.models.load import disable_dropout, load_causal_lm, load_tokenizer
from alignkit.rewards import build_reward
from alignkit.training.order import DataOrder
from tests.conftest import TINYSTORIES

GOOD = ["happy", "kind", "sunny", "warm", "smiled", "love", "friends", "fun"]
BAD = ["sad", "angry", "cold", "cried", "dark", "lost", "broke", "mean"]
NAMES = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia", "Sam", "Anna", "Tim", "Zoe"]
PLACES = ["park", "sea", "shop", "woods"]


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize(
    "r_w, r_l, margin, p, c, expected",
    [
        # z = 1 − (−1) = 2: −log σ(2) = log(1 + e^−2) = 0.126928011043
        (1.0, -1.0, None, None, 0.0, math.log1p(math.exp(-2))),
        # margin 0.5: z = 1.5, log(1 + e^−1.5) = 0.201413277982
        (1.0, -1.0, 0.5, None, 0.0, math.log1p(math.exp(-1.5))),
        # margin larger than the gap: z = 2 − 3 = −1, log(1 + e^1) = 1.313261687518
        (1.0, -1.0, 3.0, None, 0.0, math.log1p(math.exp(1))),
        # centring c = 0.1 with r_w + r_l = 1.5 − 0.5 = 1: log(1 + e^−2) + 0.1·1² = 0.226928011043
        (1.5, -0.5, None, None, 0.1, math.log1p(math.exp(-2)) + 0.1),
        # soft label p = 0.8, z = 2: −0.8 log σ(2) − 0.2 log σ(−2) = log(1 + e^−2) + 0.2·2 = 0.526928011043
        (1.0, -1.0, None, 0.8, 0.0, math.log1p(math.exp(-2)) + 0.4),
        # all at once: z = 2 − 0.5 = 1.5, p = 0.8, c = 0.1, r_w + r_l = 1:
        # log(1 + e^−1.5) + 0.2·1.5 + 0.1 = 0.601413277982
        (1.5, -0.5, 0.5, 0.8, 0.1, math.log1p(math.exp(-1.5)) + 0.3 + 0.1),
    ],
)
def test_bradley_terry_loss_by_hand(r_w, r_l, margin, p, c, expected):
    out = bradley_terry_loss(
        t(r_w),
        t(r_l),
        margin=None if margin is None else t(margin),
        preference=None if p is None else t(p),
        center_rewards_coefficient=c,
    )
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (r_w, r_l)
    assert ("center_penalty" in out.metrics) == (c > 0)


def test_bradley_terry_gradient_by_hand():
    """d/dr_w = −σ(−z) + 2c(r_w + r_l) and d/dr_l = +σ(−z) + 2c(r_w + r_l), z = r_w − r_l − m.
    r_w = 0.5, r_l = 0.25, m = 0.25: z = 0, σ(0) = 1/2; c = 0.5, r_w + r_l = 0.75: 2c·0.75 = 0.75.
    So d/dr_w = −0.5 + 0.75 = 0.25 and d/dr_l = 0.5 + 0.75 = 1.25."""
    r_w, r_l = t(0.5).requires_grad_(), t(0.25).requires_grad_()
    bradley_terry_loss(r_w, r_l, margin=t(0.25), center_rewards_coefficient=0.5).losses.sum().backward()
    assert r_w.grad.item() == pytest.approx(0.25, abs=1e-12)
    assert r_l.grad.item() == pytest.approx(1.25, abs=1e-12)
    # a batch: the per-pair losses are independent (each pair's gradient is its own)
    rw, rl = t(1.0, -2.0).requires_grad_(), t(0.0, 1.0).requires_grad_()
    bradley_terry_loss(rw, rl).losses.sum().backward()
    expected = -torch.sigmoid(-(t(1.0, -2.0) - t(0.0, 1.0)))
    torch.testing.assert_close(rw.grad, expected)
    torch.testing.assert_close(rl.grad, -expected)


# ---------------------------------------------------------------------------------------------
# data: the classifier's input sequences, and length-grouped batches


def sentiment_rows(n: int, seed: int, margin: bool = False) -> list[dict]:
    """Pairs whose chosen response uses 'good' words and rejected 'bad' ones, padded with a random number
    of names (so lengths vary): a signal a reward model must learn to read."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {"prompt": f"{rng.choice(NAMES)} went to the {rng.choice(PLACES)}. It was"}
        for key, words in (("chosen", GOOD), ("rejected", BAD)):
            extra = rng.choices(NAMES, k=rng.randint(0, 4))
            row[key] = " " + " ".join(rng.choices(words, k=2) + extra) + "."
        if margin:
            row["margin"] = rng.choice([0.0, 0.5, 1.0])
        rows.append(row)
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT (hidden 32, 2 layers) with a real WordPiece BertTokenizerFast over a small vocab."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    words = [w.lower() for w in GOOD + BAD + NAMES + PLACES] + "went to the it was . , a".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizerFast(vocab=vocab).save_pretrained(path)  # transformers 5 ignores a vocab_file= argument
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path, safe_serialization=True)  # a base encoder, no head yet
    return path


def test_classifier_inputs_are_the_tokenizers_own_and_keep_the_response(bert_dir, tmp_path):
    """prompt_ids + chosen_ids is what the tokenizer gives for `prompt + chosen` (TinyStories: [BOS] ...,
    no EOS; BERT: [CLS] ... [SEP]); over max_prompt_length the prompt loses its start, never the
    [CLS] / BOS, and the response is whole."""
    rows = [
        {"prompt": "Lily went to the park. It was", "chosen": " happy kind.", "rejected": " sad cold dark."},
        {"prompt": "Tom went to the sea. " * 6 + "It was", "chosen": " warm fun.", "rejected": " lost."},
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    for path in (TINYSTORIES, bert_dir):
        tokenizer = load_tokenizer(str(path))
        parsed = load_preference_rows(data, "train", tokenizer).rows
        examples, _ = tokenize_preference_rows(parsed, tokenizer, 64, 16)
        pairs, dropped = classifier_pairs(examples, tokenizer, 64, 16)
        assert dropped == 0
        short, long = pairs
        for key in ("chosen", "rejected"):
            full = tokenizer(rows[0]["prompt"] + rows[0][key])["input_ids"]
            assert short["prompt_ids"] + short[f"{key}_ids"] == full, (path, key)
            whole = tokenizer(rows[1]["prompt"] + rows[1][key])["input_ids"]
            seq = long["prompt_ids"] + long[f"{key}_ids"]
            assert len(long["prompt_ids"]) == 16 and seq[0] == whole[0]  # [CLS] / BOS stays first
            assert seq[1:] == whole[len(whole) - len(seq) + 1 :]  # the end of the text: response whole


def test_length_grouped_order_is_a_permutation_of_similar_lengths_and_repeats():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (203,), generator=g).tolist()
    grouped = DataOrder(203, batch_size=4, grad_accum=2, seed=1, lengths=lengths)
    plain = DataOrder(203, batch_size=4, grad_accum=2, seed=1)
    for epoch in range(2):
        perm = grouped.permutation(epoch)
        assert sorted(perm) == list(range(203))
        assert perm == grouped.permutation(epoch)  # a resumed run sees the same steps
    assert grouped.permutation(0) != grouped.permutation(1)

    def padded_tokens(order: DataOrder) -> int:  # tokens of the micro-batches, each padded to its longest
        steps = range(order.n_examples // order.rows_per_step)  # the full steps of epoch 0
        return sum(len(mb) * max(lengths[i] for i in mb) for s in steps for mb in order.micro_batches(s))

    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    first_steps = [grouped.micro_batches(s) for s in range(3)]  # the steps themselves come in random order
    assert len({max(lengths[i] for mb in step for i in mb) for step in first_steps}) == 3


# ---------------------------------------------------------------------------------------------
# training: learn, save, load back, score


def rewards_one_by_one(path, prompts, responses) -> torch.Tensor:
    """Rewards from the saved classifier loaded the standard way, one unpadded text at a time."""
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.tensor(
            [model(**tokenizer(p + r, return_tensors="pt")).logits.item() for p, r in zip(prompts, responses)]
        )


def last_eval(out_dir) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "eval"][-1]


def check_saved_model(final, eval_rows, logged: dict) -> None:
    """The saved classifier gives, loaded back, the rewards the trained model logged on the held-out
    pairs; the classifier reward source scores with it; and the one-forward batch layout used in
    training (shared prompt or not) equals the standard per-text forward."""
    prompts = [r["prompt"] for r in eval_rows]
    chosen = rewards_one_by_one(final, prompts, [r["chosen"] for r in eval_rows])
    rejected = rewards_one_by_one(final, prompts, [r["rejected"] for r in eval_rows])
    assert float(chosen.mean()) == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert float(rejected.mean()) == pytest.approx(logged["rewards/rejected"], abs=1e-5)
    assert float((chosen > rejected).float().mean()) == pytest.approx(logged["rewards/accuracies"])

    source = build_reward(
        {"type": "classifier", "model": str(final), "text": "{prompt}{response}", "function_to_apply": "none"}
    )
    torch.testing.assert_close(
        source.score(prompts, [r["chosen"] for r in eval_rows]), chosen, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        source.score(prompts, [r["rejected"] for r in eval_rows]), rejected, atol=1e-5, rtol=0
    )

    tokenizer = load_tokenizer(str(final))
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    parsed = load_preference_rows(write_jsonl(final / "eval.jsonl", eval_rows), "train", tokenizer).rows
    examples, _ = classifier_pairs(tokenize_preference_rows(parsed, tokenizer, 64, 32)[0], tokenizer, 64, 32)
    for share in (False, True) if model.config.model_type == "llama" else (False,):
        with torch.no_grad():
            out = pair_rewards(model, make_collate(tokenizer.pad_token_id, share)(examples))
            c, r = out["chosen"], out["rejected"]
        torch.testing.assert_close(c, chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(r, rejected, atol=1e-5, rtol=0)


def cli_args(model, data, out, *extra) -> list[str]:
    return [
        "reward",
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "batch_size=8",
        "max_length=64",
        "max_prompt_length=32",
        "warmup_ratio=0",
        "progress=false",
        "save_steps=0",
        "eval_steps=1000",
        *extra,
    ]


def test_causal_value_head_learns_saves_and_scores_through_the_cli(tmp_path):
    """The pretrained TinyStories LM (tied embeddings stored only as lm_head.weight) with a value head,
    prompt shared, through `alignkit reward`: held-out accuracy > 0.9, and the saved classifier is the
    trained one, with the LM's embedding (not a random one)."""
    train_rows, eval_rows = sentiment_rows(160, seed=0, margin=True), sentiment_rows(40, seed=1)
    data, eval_data = (
        write_jsonl(tmp_path / "train.jsonl", train_rows),
        write_jsonl(tmp_path / "eval.jsonl", eval_rows),
    )
    out = tmp_path / "out"
    assert main(cli_args(TINYSTORIES, data, out, f"eval_data={eval_data}", "lr=3e-3", "max_steps=40")) == 0
    logged = last_eval(out)
    assert logged["rewards/accuracies"] > 0.9 and logged["rewards/margins"] > 1.0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["backbone"] == "auto" and resolved["share_prompt"] is None

    final = out / "final"
    saved = AutoModelForSequenceClassification.from_pretrained(final)
    assert type(saved).__name__ == "LlamaForSequenceClassification" and saved.config.id2label == {0: "reward"}
    lm = load_causal_lm(str(TINYSTORIES))
    moved = (saved.model.embed_tokens.weight - lm.lm_head.weight).abs().max()
    assert 0 < moved < 0.5  # trained from the LM's embedding: moved by training, not re-drawn at random
    check_saved_model(final, eval_rows, logged)


def small_run(model, tmp_path, **overrides) -> RewardConfig:
    """A 40-step run on the sentiment pairs (160 to train on, 40 held out: `sentiment_rows(40, seed=1)`)."""
    return RewardConfig(
        model=str(model),
        data=write_jsonl(tmp_path / "train.jsonl", sentiment_rows(160, seed=0)),
        eval_data=write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(40, seed=1)),
        output_dir=str(tmp_path / "out"),
        batch_size=8,
        lr=2e-3,
        max_steps=40,
        max_length=64,
        max_prompt_length=32,
        warmup_ratio=0.0,
        progress=False,
        save_steps=0,
        eval_steps=1000,
        report=False,
        **overrides,
    )


def test_encoder_learns_saves_and_scores(bert_dir, tmp_path):
    """A tiny BERT through AutoModelForSequenceClassification(num_labels=1), read with [CLS] prompt
    response [SEP]: held-out accuracy > 0.9; loads back and scores as trained."""
    from alignkit.algorithms.reward_model import train

    eval_rows = sentiment_rows(40, seed=1)
    cfg = small_run(bert_dir, tmp_path)
    final = train(cfg)
    logged = last_eval(tmp_path / "out")
    assert logged["rewards/accuracies"] > 0.9
    assert (
        type(AutoModelForSequenceClassification.from_pretrained(final)).__name__
        == "BertForSequenceClassification"
    )
    check_saved_model(final, eval_rows, logged)


def test_disable_dropout_makes_training_forwards_deterministic(bert_dir):
    """BERT keeps dropout 0.1 in its config; with every dropout at 0, a training-mode forward is the
    eval-mode one (so r_w − r_l carries no mask noise)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=1)
    ids = load_tokenizer(str(bert_dir))(
        ["lily was happy .", "tom was sad ."], padding=True, return_tensors="pt"
    )
    model.train()
    assert not torch.equal(model(**ids).logits, model(**ids).logits)
    disable_dropout(model)
    noisy = model(**ids).logits
    torch.testing.assert_close(noisy, model(**ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(noisy, model.eval()(**ids).logits, atol=1e-6, rtol=0)


def test_lora_reward_model_is_saved_merged_with_its_trained_head(tmp_path):
    """LoRA (task SEQ_CLS): the adapter and the fully trained score head are merged into a plain classifier
    that reproduces the logged held-out rewards."""
    train_rows, eval_rows = sentiment_rows(64, seed=0), sentiment_rows(16, seed=1)
    data, eval_data = (
        write_jsonl(tmp_path / "train.jsonl", train_rows),
        write_jsonl(tmp_path / "eval.jsonl", eval_rows),
    )
    out = tmp_path / "out"
    extra = [f"eval_data={eval_data}", "lr=3e-3", "max_steps=16", "lora.enabled=true", "lora.r=4"]
    assert main(cli_args(TINYSTORIES, data, out, *extra)) == 0
    logged = last_eval(out)
    assert logged["rewards/margins"] > 0.5  # it learned something to check the merge against
    assert not (out / "final" / "adapter_config.json").exists()
    check_saved_model(out / "final", eval_rows, logged)


def test_margin_and_centring_reach_the_loss(tmp_path):
    """One pair per step, so the logged step is that pair: loss = log(1 + e^−(Δ − m)) + c·(r_w + r_l)²."""
    rows = sentiment_rows(4, seed=0)
    for row in rows:
        row["margin"] = 1.5
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    extra = ["batch_size=1", "max_steps=1", "center_rewards_coefficient=0.3"]
    assert main(cli_args(TINYSTORIES, data, out, *extra)) == 0
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    r_w, r_l = step["rewards/chosen"], step["rewards/rejected"]
    expected = math.log1p(math.exp(-(r_w - r_l - 1.5))) + 0.3 * (r_w + r_l) ** 2
    assert step["loss"] == pytest.approx(expected, rel=1e-5)
    assert step["center_penalty"] == pytest.approx((r_w + r_l) ** 2, rel=1e-5)


def test_settings_that_cannot_apply_are_errors(bert_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=0))
    base = ["reward", f"model={bert_dir}", f"data={data}", f"output_dir={tmp_path / 'out'}"]
    assert main([*base, "share_prompt=true"]) == 1
    assert "share_prompt needs a causal backbone" in capsys.readouterr().err
    assert main([*base, "backbone=decoder"]) == 2  # refused when the config loads
    assert "'backbone' must be one of auto, causal, encoder, got 'decoder'" in capsys.readouterr().err
    assert main([*base, "shuffle=false"]) == 1
    assert "group_by_length reorders the rows" in capsys.readouterr().err
    assert main([*base, "lora.enabled=true", "lora.dropout=0.1"]) == 1
    assert "lora.dropout=0.1 has no effect with disable_dropout=true" in capsys.readouterr().err
    assert main([*base, "center_rewards_coeficient=0.1"]) == 2
    assert "Did you mean 'center_rewards_coefficient'" in capsys.readouterr().err
    assert main(["reward", "--help"]) == 0
    assert "center_rewards_coefficient = 0.0" in capsys.readouterr().out


def test_every_reward_setting_is_documented():
    import dataclasses

    from alignkit.config.load import field_docs

    docs = field_docs(RewardConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(RewardConfig))
    assert RewardConfig().lora.merge  # saved as a plain classifier unless asked otherwise


def test_shipped_minilm_example_is_a_valid_config():
    """The documented run's config loads (its run itself is docs/reward_models.md, not a test)."""
    from alignkit.config.load import load_config
    from tests.conftest import REPO

    cfg = load_config(RewardConfig, str(REPO / "examples" / "reward_minilm.yaml"), ["model=x"])
    assert (cfg.backbone, cfg.max_length, cfg.max_prompt_length, cfg.eval_fraction) == (
        "encoder",
        256,
        128,
        0.1,
    )
    assert (cfg.pooling, cfg.ensemble) == ("auto", 1)  # the measured recommendation (mean, for this folder)
