"""Reward sources (classifier, profanity, rules), building them from config, composition, `alignkit score`."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.config.load import ConfigError, field_docs, load_config
from alignkit.config.tools import ScoreConfig
from alignkit.rewards import (
    RewardSet,
    RunningMeanStd,
    build_reward,
    build_rewards,
    clip,
    constraint,
    weighted_sum,
)
from alignkit.rewards.base import RewardSource, SourceOptions
from alignkit.rewards.classifier import resolve_label
from alignkit.rewards.registry import REWARD_TYPES, reward_types
from tests.conftest import REPO, TINYSTORIES, build_tiny_classifier

WORDS = "the a good bad happy sad movie story dog cat was is very not great awful i love hate it".split()
POSITIVE = ["What a wonderful, happy day! I love it.", "Thank you so much, this is great and kind."]
NEGATIVE = ["This is awful and I hate it. Terrible.", "What a horrible, sad and miserable mess."]
CLEAN = ["Have a lovely afternoon with your family.", "The recipe needs two cups of flour."]
OFFENSIVE = ["Shut up, you stupid fucking idiot.", "You are a worthless piece of shit."]


# ---------------------------------------------------------------------------------------------
# a tiny BERT classifier with a word-level tokenizer, built and saved like a hub checkpoint


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return build_tiny_classifier(
        tmp_path_factory.mktemp("tiny-bert"), ["NEGATIVE", "POSITIVE", "NEUTRAL"], WORDS
    )


def _direct_logits(path, texts, pairs=None, max_length=512):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        rows = []
        for i, t in enumerate(texts):  # one at a time: no padding at all
            enc = tokenizer(
                t, pairs[i] if pairs else None, truncation=True, max_length=max_length, return_tensors="pt"
            )
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


PROMPTS = ["i love it", "the dog", "a story", "the cat was", "i hate"]
RESPONSES = ["good movie", "was very happy", "is awful", "not great", "it is a very bad sad awful story"]


def test_classifier_logit_and_probabilities_match_a_direct_forward(bert_dir):
    logits = _direct_logits(bert_dir, RESPONSES)  # (5, 3)
    spec = {
        "type": "classifier",
        "model": str(bert_dir),
        "label": "POSITIVE",
        "batch_size": 2,
        "device": "cpu",
    }
    raw = build_reward(spec).score(PROMPTS, RESPONSES)
    assert raw.dtype == torch.float32 and raw.shape == (5,)
    torch.testing.assert_close(raw, logits[:, 1], atol=1e-5, rtol=1e-5)  # padded batches = unpadded rows
    softmax = build_reward({**spec, "function_to_apply": "softmax"}).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(softmax, logits.softmax(-1)[:, 1], atol=1e-6, rtol=1e-5)
    sigmoid = build_reward({**spec, "label": 2, "function_to_apply": "sigmoid"}).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(sigmoid, logits[:, 2].sigmoid(), atol=1e-6, rtol=1e-5)


def test_classifier_text_templates_pairs_and_truncation(bert_dir):
    spec = {"type": "classifier", "model": str(bert_dir), "label": "NEGATIVE", "device": "cpu"}
    joined = build_reward({**spec, "text": "{prompt} {response}"}).score(PROMPTS, RESPONSES)
    expected = _direct_logits(bert_dir, [f"{p} {r}" for p, r in zip(PROMPTS, RESPONSES)])[:, 0]
    torch.testing.assert_close(joined, expected, atol=1e-5, rtol=1e-5)
    paired = build_reward({**spec, "text": "{prompt}", "text_pair": "{response}"}).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(
        paired, _direct_logits(bert_dir, PROMPTS, RESPONSES)[:, 0], atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(paired, joined)  # token types differ: the pair really is a pair
    short = build_reward({**spec, "max_length": 4}).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(
        short, _direct_logits(bert_dir, RESPONSES, max_length=4)[:, 0], atol=1e-5, rtol=1e-5
    )
    assert short[4] != build_reward(spec).score(PROMPTS, RESPONSES)[4]  # the long response was cut


def test_classifier_labels_and_errors(bert_dir):
    id2label = {0: "NEGATIVE", 1: "POSITIVE", 2: "NEUTRAL"}
    assert resolve_label("POSITIVE", id2label) == 1 and resolve_label("2", id2label) == 2
    assert resolve_label(None, {0: "LABEL_0"}) == 0
    with pytest.raises(
        ConfigError, match="has 3 labels \\(0=NEGATIVE, 1=POSITIVE, 2=NEUTRAL\\); set 'label'"
    ):
        resolve_label(None, id2label)
    with pytest.raises(ConfigError, match="label 'positive' is not a label"):
        build_reward({"type": "classifier", "model": str(bert_dir), "label": "positive", "device": "cpu"})
    with pytest.raises(ConfigError, match="function_to_apply 'probs' is not one of"):
        build_reward({"type": "classifier", "model": str(bert_dir), "function_to_apply": "probs"})


def test_decoder_classifier_reads_the_last_real_token_under_padding(tmp_path):
    """A Llama classifier saved without pad_token_id: the reward sets it, so padded batches are exact."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=None,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINYSTORIES).save_pretrained(tmp_path)
    reward = build_reward({"type": "classifier", "model": str(tmp_path), "batch_size": 5, "device": "cpu"})
    batched = reward.score(PROMPTS, RESPONSES)
    one_by_one = torch.cat([reward.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    assert batched.std() > 0


# ---------------------------------------------------------------------------------------------
# lexicon, profanity, length, regex


def test_vader_and_profanity_order_obvious_cases():
    vader = build_reward({"type": "vader"})
    profanity = build_reward({"type": "profanity"})
    empty = [""] * 2
    assert vader.score(empty, POSITIVE).min() > 0.5 > -0.5 > vader.score(empty, NEGATIVE).max()
    clean, offensive = profanity.score(empty, CLEAN), profanity.score(empty, OFFENSIVE)
    assert clean.min() > 0.8 and offensive.max() < 0.2  # 1 - P(offensive)
    assert ((0 <= clean) & (clean <= 1)).all() and clean.dtype == torch.float32
    # The template decides what is read: an offensive prompt does not count against a clean response.
    assert profanity.score(OFFENSIVE, CLEAN).min() > 0.8
    both = build_reward({"type": "profanity", "text": "{prompt} {response}"}).score(OFFENSIVE, CLEAN)
    assert both.max() < 0.2


def test_length_and_regex_by_hand():
    responses = ["one two three", "a b c d e f g", "", "Final answer: 42. Final answer: 43"]
    prompts = [""] * 4
    words = build_reward({"type": "length"}).score(prompts, responses)
    assert words.tolist() == [3, 7, 0, 6]
    chars = build_reward({"type": "length", "unit": "chars", "scale": 10}).score(prompts, responses)
    assert chars.tolist() == pytest.approx([1.3, 1.3, 0.0, 3.4])
    target = build_reward({"type": "length", "target": 5, "scale": 2}).score(prompts, responses)
    assert target.tolist() == [-1.0, -1.0, -2.5, -0.5]  # -|n - 5| / 2
    found = build_reward({"type": "regex", "pattern": r"final answer: \d+", "flags": "i"})
    assert found.score(prompts, responses).tolist() == [0, 0, 0, 1]
    count = build_reward({"type": "regex", "pattern": r"\d+", "mode": "count"})
    assert count.score(prompts, responses).tolist() == [0, 0, 0, 2]
    full = build_reward({"type": "regex", "pattern": r"[a-z ]+", "mode": "fullmatch"})
    assert full.score(prompts, responses).tolist() == [1, 1, 0, 0]


# ---------------------------------------------------------------------------------------------
# building from config


def test_unknown_types_and_keys_name_the_closest_valid_one():
    with pytest.raises(ConfigError, match="unknown reward type 'vadr'. Did you mean 'vader'"):
        build_reward({"type": "vadr"})
    with pytest.raises(ConfigError, match="missing 'type'"):
        build_reward({"weight": 1})
    with pytest.raises(
        ConfigError, match=r"rewards\[1\]: unknown key 'lable' for ClassifierOptions. Did you mean 'label'"
    ):
        build_rewards([{"type": "vader"}, {"type": "classifier", "model": "x", "lable": "POSITIVE"}])
    with pytest.raises(ConfigError, match=r"'rewards\[0\].weight': expected a number, got 'heavy'"):
        build_rewards([{"type": "vader", "weight": "heavy"}])
    with pytest.raises(ConfigError, match=r"rewards\[1\]: the name 'vader' is already used by rewards\[0\]"):
        build_rewards([{"type": "vader"}, {"type": "vader", "weight": 2}])
    with pytest.raises(ConfigError, match="'weight' plays no part for a constraint cost"):
        build_reward({"type": "length", "cost_threshold": 3, "weight": 2})
    with pytest.raises(ConfigError, match="is not a valid regex"):
        build_reward({"type": "regex", "pattern": "(unclosed"})
    with pytest.raises(ConfigError, match="uses neither {prompt} nor {response}"):
        build_reward({"type": "vader", "text": "{answer}"})


def test_every_source_implements_the_interface_and_documents_its_options():
    assert set(reward_types()) == set(REWARD_TYPES)
    for kind, (options_cls, source_cls) in reward_types().items():
        docs = field_docs(options_cls)
        assert all(docs.get(f.name) for f in dataclasses.fields(options_cls)), kind
        assert options_cls.__doc__ and source_cls.__doc__, kind
        assert issubclass(options_cls, SourceOptions), kind
    assert isinstance(build_reward({"type": "vader"}), RewardSource)


def test_a_spec_imports_only_its_own_source_module():
    """The registry names sources instead of importing them: a typo fails, and a vader spec builds, without
    loading the classifier or judge modules (and the model code they bring)."""
    code = (
        "import json, sys\n"
        "from alignkit.config.load import ConfigError\n"
        "from alignkit.rewards import build_reward\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith('alignkit.rewards.'))\n"
        "try:\n"
        "    build_reward({'type': 'vadr'})\n"
        "except ConfigError:\n"
        "    print(json.dumps(loaded()))\n"
        "build_reward({'type': 'vader'})\n"
        "print(json.dumps(loaded()))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    after_typo, after_vader = map(json.loads, run.stdout.splitlines())
    assert after_typo == ["alignkit.rewards.base", "alignkit.rewards.compose", "alignkit.rewards.registry"]
    assert after_vader == sorted([*after_typo, "alignkit.rewards.rules"])


def test_config_list_of_mappings_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("rewards:\n  - type: vader\n  - {type: length, weight: -0.1}\nbatch_size: 3\n")
    cfg = load_config(ScoreConfig, str(path), ["data=x.jsonl"])
    assert cfg.rewards == [{"type": "vader"}, {"type": "length", "weight": -0.1}] and cfg.batch_size == 3
    assert load_config(ScoreConfig, None, ["rewards=[{type: vader}]"]).rewards == [{"type": "vader"}]
    with pytest.raises(ConfigError, match="'rewards': expected a list, got 'vader'"):
        load_config(ScoreConfig, None, ["rewards=vader"])
    with pytest.raises(ConfigError, match=r"'rewards\[1\]': expected a mapping of key: value, got 3"):
        load_config(ScoreConfig, None, ["rewards=[{type: vader}, 3]"])
    path.write_text("reward:\n  - type: vader\n")
    with pytest.raises(ConfigError, match="unknown config key 'reward'.*Did you mean 'rewards'"):
        load_config(ScoreConfig, str(path))


# ---------------------------------------------------------------------------------------------
# composition


class Fixed:
    """A reward source that returns given scores in turn (one tensor per call)."""

    def __init__(self, name: str, weight: float, *batches):
        self.name, self.weight, self.batches = name, weight, list(batches)

    def score(self, prompts, responses):
        return torch.tensor(self.batches.pop(0), dtype=torch.float32)

    def metrics(self):
        return {"calls": 1.0}


def test_weighted_sum_clip_and_constraint_by_hand():
    scores = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5, 4.0])}
    # 2*1 - 0.5*0.5 = 1.75; 2*(-2) - 0.5*4 = -6
    assert weighted_sum(scores, {"a": 2.0, "b": -0.5}).tolist() == [1.75, -6.0]
    assert clip(torch.tensor([1.75, -6.0]), 2.0).tolist() == [1.75, -2.0]
    cost, violated = constraint(torch.tensor([0.1, 0.3, 0.2]), 0.2)
    assert violated.tolist() == [False, True, False]  # at the threshold is allowed

    rs = RewardSet([Fixed("a", 2.0, [1.0, -2.0]), Fixed("b", -0.5, [0.5, 4.0]), Fixed("c", 1.0, [0.1, 0.3])],
                   cost_thresholds={"c": 0.2}, clip=2.0)  # fmt: skip
    out = rs(["p", "q"], ["x", "y"])
    assert out.total.tolist() == [1.75, -2.0]  # the cost c is not summed in
    assert out.violated["c"].tolist() == [False, True]
    assert out.costs["c"].tolist() == pytest.approx([0.1, 0.3])
    assert out.stats["c/violation_rate"] == 0.5 and out.stats["reward/clip_fraction"] == 0.5
    assert out.stats["a/mean"] == -0.5 and out.stats["a/std"] == 1.5 and out.stats["b/calls"] == 1.0


def test_normalise_then_sum_by_hand_and_state_round_trip():
    """a = [1, 2, 3]: mean 2, population var 2/3, so z = ±sqrt(3/2) = ±1.2247 and 0. b = 10 a has the
    same z-scores, so with weights 1 and 2 the total is 3 z whatever the units."""
    z = math.sqrt(1.5)
    rs = RewardSet([Fixed("a", 1.0, [1, 2], [3]), Fixed("b", 2.0, [10, 20], [30])], normalize=True, eps=0.0)
    rs(["p"] * 2, ["r"] * 2)  # stats after [1, 2]
    last = rs(["p"], ["r"])  # stats after [1, 2, 3], this batch included
    assert rs.stats["a"].mean == 2.0 and rs.stats["a"].var == pytest.approx(2 / 3)
    assert last.total.item() == pytest.approx(3 * z, rel=1e-6)
    state = json.loads(json.dumps(rs.state_dict()))  # survives a trip through a checkpoint file
    resumed = RewardSet(
        [Fixed("a", 1.0, [1.0, 2.0, 3.0]), Fixed("b", 2.0, [10.0, 20.0, 30.0])], normalize=True, eps=0.0
    )
    resumed.load_state_dict(state)
    frozen = resumed(["p"] * 3, ["r"] * 3, update=False)
    assert frozen.total.tolist() == pytest.approx([-3 * z, 0.0, 3 * z], rel=1e-6)
    assert resumed.stats["a"].count == 3


def test_running_stats_do_not_depend_on_batching():
    torch.manual_seed(0)
    x = torch.randn(101) * 3 + 5
    whole, parts = RunningMeanStd(), RunningMeanStd()
    whole.update(x)
    for chunk in x.split([1, 17, 50, 33]):
        parts.update(chunk)
    assert parts.mean == pytest.approx(float(x.double().mean()), rel=1e-12)
    assert parts.var == pytest.approx(float(x.double().var(unbiased=False)), rel=1e-10)
    assert (parts.mean, parts.var) == pytest.approx((whole.mean, whole.var), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# alignkit score


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_command_end_to_end(tmp_path, capsys):
    data = _rows(
        tmp_path / "rows.jsonl",
        [{"prompt": "", "response": r, "id": i} for i, r in enumerate(POSITIVE + NEGATIVE + OFFENSIVE)],
    )
    config = tmp_path / "scores.yaml"
    sources = [{"type": "vader", "weight": 2.0}, {"type": "profanity", "name": "clean"}]
    config.write_text(yaml.safe_dump({"rewards": sources}))
    output = tmp_path / "out" / "scored.jsonl"
    assert main(["score", str(config), f"data={data}", f"output={output}", "batch_size=4"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    responses = [r["response"] for r in rows]
    assert [r["id"] for r in rows] == list(range(6))  # input order and columns kept
    vader = build_reward({"type": "vader"}).score([""] * 6, responses)
    clean = build_reward({"type": "profanity"}).score([""] * 6, responses)
    assert [r["score_vader"] for r in rows] == pytest.approx(vader.tolist(), abs=1e-6)
    assert [r["score_clean"] for r in rows] == pytest.approx(clean.tolist(), abs=1e-6)
    assert [r["reward"] for r in rows] == pytest.approx((2 * vader + clean).tolist(), abs=1e-5)
    printed = capsys.readouterr().out
    assert "scored 6 rows" in printed and "p50" in printed and "clean" in printed
    summary = json.loads((tmp_path / "out" / "scored.summary.json").read_text())
    assert summary["sources"]["vader"]["mean"] == pytest.approx(float(vader.double().mean()), abs=1e-6)
    assert summary["sources"]["reward"]["count"] == 6 and summary["config"]["rewards"][1]["name"] == "clean"


def test_shipped_example_runs(tmp_path, capsys):
    output = tmp_path / "scored.jsonl"
    args = ["score", str(REPO / "examples" / "rewards.yaml"), f"data={REPO / 'examples' / 'responses.jsonl'}"]
    assert main([*args, f"output={output}"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert {"score_vader", "score_clean", "score_words", "reward", "violated_words"} <= set(rows[0])
    assert [r["violated_words"] for r in rows] == [r["score_words"] > 20 for r in rows]


def test_score_command_reports_bad_rows_and_bad_sources(tmp_path, capsys):
    data = _rows(
        tmp_path / "rows.jsonl",
        [{"prompt": "p", "response": "fine"}, {"prompt": "p", "response": 3}, {"prompt": "p"}],
    )
    output = tmp_path / "scored.jsonl"
    assert main(["score", f"data={data}", f"output={output}", "rewards=[{type: vader}]"]) == 1
    err = capsys.readouterr().err
    assert "2 problems in 2 rows" in err
    assert f"{data}:2: field 'response': found number (expected a string)" in err
    assert f"{data}:3: field 'response': missing" in err and not output.exists()
    assert main(["score", f"data={data}", f"output={output}", "rewards=[{type: vader, wieght: 2}]"]) == 1
    assert (
        "rewards[0]: unknown key 'wieght' for VaderOptions. Did you mean 'weight'?" in capsys.readouterr().err
    )
    assert main(["score", f"data={data}", f"output={output}"]) == 1
    assert "no reward sources" in capsys.readouterr().err


def test_source_metrics_reduce_over_processes_as_counts_and_row_weighted_means():
    """reduce_metrics: what one process holding every row would report. Counts are summed, a key one
    process lacks counting 0 there; a RowMean is averaged by rows: (0.5·2 + 0.2·6) / 8 = 0.275."""
    from alignkit.rewards.base import RowMean, reduce_metrics

    parts = [
        {"fallbacks": 2.0, "uncertainty": RowMean(0.5, 2)},
        {"fallbacks": 1.0, "fallbacks_timeout": 1.0, "uncertainty": RowMean(0.2, 6)},
    ]
    out = reduce_metrics(parts)
    assert out == {"fallbacks": 3.0, "uncertainty": pytest.approx(0.275), "fallbacks_timeout": 1.0}
    assert reduce_metrics(parts[:1]) == {"fallbacks": 2.0, "uncertainty": 0.5}  # one process: as it is


class _AnswerSource:
    """A source that reads the row column `answer` (1 when the response equals it, None-as-NaN when the row
    has no answer) and records the contexts it was given."""

    name, weight, columns = "answer", 1.0, ("answer",)

    def __init__(self):
        self.seen = []

    def score(self, prompts, responses, context):
        self.seen.append(context)
        answers = context.columns["answer"]
        return torch.tensor(
            [math.nan if a is None else float(r == a) for r, a in zip(responses, answers)],
            dtype=torch.float32,
        )

    def metrics(self):
        return {}


class _LengthSource:
    name, weight = "chars", 0.5

    def score(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])

    def metrics(self):
        return {}


def test_a_source_declaring_columns_gets_its_columns_and_nan_is_no_opinion():
    """Rows: answers '4', None, '7'; responses '4', '5', '6'. The answer source scores 1, NaN, 0; the length
    source (weight 0.5, no columns: called as before) 1, 1, 1. Totals: 1 + 0.5 = 1.5; NaN left out: 0.5;
    0 + 0.5 = 0.5. With the length source a cost (cost_threshold), row 2 has no reward term: NaN."""
    from alignkit.rewards.base import ScoreContext

    answer = _AnswerSource()
    rewards = RewardSet([answer, _LengthSource()])
    context = ScoreContext(
        {"answer": ["4", None, "7"], "unused": [1, 2, 3]},
        completion_ids=[[1], [2], [3]],
        group_ids=[0, 0, 1],
        step=5,
    )
    out = rewards(["p", "p", "q"], ["4", "5", "6"], context=context)
    assert out.total.tolist() == [1.5, 0.5, 0.5]
    assert out.stats["answer/none"] == pytest.approx(1 / 3) and out.stats["answer/mean"] == 0.5
    seen = answer.seen[-1]
    assert seen.columns == {"answer": ["4", None, "7"]}  # only what it declared
    assert (seen.completion_ids, seen.group_ids, seen.step) == ([[1], [2], [3]], [0, 0, 1], 5)
    assert rewards.columns == ("answer",)
    costs = RewardSet([answer, _LengthSource()], cost_thresholds={"chars": 10.0})
    total = costs(["p", "p", "q"], ["4", "5", "6"], context=context).total
    assert total[0] == 1 and total[1].isnan() and total[2] == 0


def test_a_missing_column_names_the_source_and_the_columns_there():
    from alignkit.rewards.base import ScoreContext

    rewards = RewardSet([_AnswerSource()])
    with pytest.raises(ValueError, match=r"'answer' reads the column\(s\) answer.*columns there: solution"):
        rewards(["p"], ["4"], context=ScoreContext({"solution": ["4"]}))
    with pytest.raises(ValueError, match="passes no row columns"):
        rewards(["p"], ["4"])
    with pytest.raises(ValueError, match="for 2 responses, but 1"):
        rewards(["p"], ["4"], context=ScoreContext({"answer": ["4", "5"]}))


def test_the_normaliser_leaves_no_opinion_out():
    """Values 1, NaN, 3: mean 2, population variance 1; NaN stays NaN once normalised."""
    rms = RunningMeanStd(eps=0.0)
    rms.update(torch.tensor([1.0, math.nan, 3.0]))
    assert (rms.count, rms.mean, rms.var) == (2, 2.0, 1.0)
    out = rms.normalize(torch.tensor([3.0, math.nan]))
    assert out[0] == 1.0 and out[1].isnan()
