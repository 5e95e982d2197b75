"""The PPO case-study configs in examples/ppo run as written, offline: the FLAN-T5 ones with a tiny random T5
and tiny classifiers that carry the real models' labels in place of the hub models, the story one on the
shipped model. Everything else in each file (data, reward weights and labels, PPO settings) is used as is."""

from __future__ import annotations

import json

import pytest

import alignkit.algorithms.ppo as ppo
from alignkit.config.load import load_config
from alignkit.config.online import PPOConfig
from tests.conftest import REPO, build_tiny_classifier, build_tiny_t5

WORDS = "the a council city said would was were of to and in on for by it new".split()
# The label names of the hub models the configs name (their config.json id2label), in index order.
HUB_LABELS = {
    "textattack/roberta-base-CoLA": ["LABEL_0", "LABEL_1"],
    "cardiffnlp/twitter-roberta-base-sentiment": ["LABEL_0", "LABEL_1", "LABEL_2"],
    "facebook/roberta-hate-speech-dynabench-r4-target": ["nothate", "hate"],
}
SMALL = [
    "max_steps=2",
    "batch_size=2",
    "generation.max_new_tokens=6",
    "ppo_epochs=2",
    "progress=false",
    "save_steps=0",
]


@pytest.mark.parametrize("name", ["flan_t5_news", "flan_t5_hh_summaries"])
def test_flan_t5_case_study_configs_run_offline_with_tiny_models(tmp_path, name):
    path = REPO / "examples" / "ppo" / f"{name}.yaml"
    t5 = build_tiny_t5(tmp_path / "t5")
    cfg = load_config(PPOConfig, str(path), [f"model={t5}", f"output_dir={tmp_path / 'out'}", *SMALL])
    assert cfg.model == str(t5) and cfg.rewards
    for i, spec in enumerate(cfg.rewards):  # each hub classifier -> a tiny one with the same labels
        labels = HUB_LABELS[spec["model"]]
        assert spec["label"] in labels, spec
        spec["model"] = str(build_tiny_classifier(tmp_path / f"clf{i}", labels, WORDS, seed=i))
    ppo.train(cfg)
    lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    train = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    for spec in cfg.rewards:
        assert f"rewards/{spec['name']}/mean" in train[-1]
    # The total is the weighted sum of the sources (weights as the file gives them).
    expected = sum(spec.get("weight", 1.0) * train[0][f"rewards/{spec['name']}/mean"] for spec in cfg.rewards)
    assert train[0]["reward"] == pytest.approx(expected, abs=1e-5)
    assert (tmp_path / "out" / "final" / "config.json").exists()


def test_happy_stories_config_runs_on_the_shipped_model(tmp_path):
    path = REPO / "examples" / "ppo" / "happy_stories.yaml"
    cfg = load_config(PPOConfig, str(path), [f"output_dir={tmp_path / 'out'}", *SMALL, "minibatch_size=0"])
    assert cfg.model == "alignkit/assets/tinystories-656k" and cfg.rewards == [{"type": "vader"}]
    cfg.model = str(REPO / cfg.model)
    cfg.data = str(REPO / cfg.data)
    ppo.train(cfg)
    train = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [m["step"] for m in train] == [1, 2] and -1 <= train[-1]["rewards/vader/mean"] <= 1


def test_less_offensive_case_study_builds_its_dialogue_model_and_runs(tmp_path):
    """scripts/build_dialogue_model.py (tokenizer trained on the HH sample, random Llama, alignkit sft on
    both replies of 1,395 rows, the unseen prompts of the last 200), shrunk to a 1-layer model and 2 SFT steps, then
    examples/ppo/less_offensive.yaml on it with the profanity reward."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_dialogue_model", REPO / "scripts" / "build_dialogue_model.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = tmp_path / "dialogue"
    final = script.build(root, hidden=32, layers=1, sft_args=["max_steps=2", "progress=false"])
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    sft_rows = (root / "sft_rows.jsonl").read_text().splitlines()
    held_out = (root / "heldout_prompts.jsonl").read_text().splitlines()
    assert len(sft_rows) == 2 * 1395  # 1,595 clean pairs: both replies of all but the last 200
    assert 150 < len(held_out) <= 200 and len(set(held_out)) == len(held_out)
    train = {json.loads(line)["prompt"] for line in (root / "train_prompts.jsonl").read_text().splitlines()}
    assert train.isdisjoint(json.loads(line)["prompt"] for line in held_out)

    path = REPO / "examples" / "ppo" / "less_offensive.yaml"
    overrides = [
        f"model={final}",
        f"data={root / 'train_prompts.jsonl'}",
        f"output_dir={tmp_path / 'out'}",
        *SMALL,
        "minibatch_size=0",
    ]
    cfg = load_config(PPOConfig, str(path), overrides)
    assert cfg.rewards == [{"type": "profanity"}] and cfg.max_prompt_length == 64
    ppo.train(cfg)
    train_lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [m["step"] for m in train_lines] == [1, 2] and 0 <= train_lines[-1]["rewards/profanity/mean"] <= 1
    # The alarms are logged (two steps are too few to fire them: docs/online_rl.md has the full run's).
    assert {"alarm/length_exploitation", "alarm/length_drift", "alarm/kl_runaway"} <= set(train_lines[-1])
