"""Models that attend within a sliding window (Mistral, Gemma 2/3, ...): share_prompt's one-row layout lets
every token see its whole segment through a 4D mask, which overrides the model's own window. The training
commands fall back to two rows there, so the log-probs are the model's."""

from __future__ import annotations

import json

import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config

from alignkit.algorithms import dpo, reward_model
from alignkit.algorithms.dpo import make_collate, pair_logps
from alignkit.config.preference import DPOConfig
from alignkit.config.supervised import RewardConfig
from alignkit.models.load import shared_prompt_fits, sliding_window
from tests.conftest import TINYSTORIES, TOKENIZER_FILES, train_metrics

EXAMPLES = [
    {
        "prompt_ids": list(range(3, 13)),
        "chosen_ids": list(range(20, 28)),
        "rejected_ids": list(range(30, 36)),
    },
    {"prompt_ids": list(range(5, 9)), "chosen_ids": list(range(40, 50)), "rejected_ids": list(range(50, 53))},
]


def tiny_mistral(window: int) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=window,
        attn_implementation="sdpa",
    )
    return MistralForCausalLM(config).eval()


@torch.no_grad()
def logps(model, share_prompt: bool) -> dict:
    examples = [{**e, "preference": 1.0, "line": i} for i, e in enumerate(EXAMPLES, 1)]
    return pair_logps(model, make_collate(0, share_prompt)(examples))


def test_the_one_row_layout_is_wrong_inside_a_window_and_exact_outside_one():
    """Segments are up to 28 tokens long. A window of 4 hides what the one-row mask shows (the two layouts
    differ); a window of 64 hides nothing (they agree): the reason for the fallback, and its threshold."""
    short, long = tiny_mistral(4), tiny_mistral(64)
    one, two = logps(short, True), logps(short, False)
    assert (one["chosen"] - two["chosen"]).abs().max() > 1e-2
    one, two = logps(long, True), logps(long, False)
    torch.testing.assert_close(one["chosen"], two["chosen"], atol=1e-5, rtol=0)
    torch.testing.assert_close(one["rejected"], two["rejected"], atol=1e-5, rtol=0)


def test_sliding_window_reads_the_config():
    assert sliding_window(tiny_mistral(4).config) == 4
    assert sliding_window(Qwen2Config(use_sliding_window=False, sliding_window=8)) is None
    # Qwen2 slides only in the layers from max_window_layers on (its config's layer_types says which).
    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=8, num_hidden_layers=2)) is None
    windowed = Qwen2Config(
        use_sliding_window=True, sliding_window=8, num_hidden_layers=4, max_window_layers=2
    )
    assert sliding_window(windowed) == 8


def windowed_model_and_pairs(tmp_path):
    """A Mistral with window 4 on the shipped tokenizer, saved, and 8 preference rows."""
    model_dir = tmp_path / "mistral"
    model = tiny_mistral(4)
    model.config.vocab_size = 2048
    model.resize_token_embeddings(2048)
    model.save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        (model_dir / name).write_bytes((TINYSTORIES / name).read_bytes())
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Tom went out {i} and", "chosen": " he was happy.", "rejected": " he was sad."}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def test_dpo_reads_a_windowed_model_in_two_rows(tmp_path):
    """DPO turns share_prompt off (and says so), so its first-step log-probs are the model's own, the same as
    an explicit share_prompt=false run's."""
    model_dir, data = windowed_model_and_pairs(tmp_path)
    assert shared_prompt_fits(str(model_dir), 48) == 4 and shared_prompt_fits(str(model_dir), 4) is None

    def run(name, **overrides):
        cfg = DPOConfig(
            model=str(model_dir), data=str(data), output_dir=str(tmp_path / name), max_steps=1, batch_size=4,
            max_length=48, max_prompt_length=32, progress=False, report=False, **overrides,
        )  # fmt: skip
        dpo.train(cfg)
        return train_metrics(cfg)[0]

    auto, two_rows = run("auto"), run("two", share_prompt=False)
    assert auto["logps/chosen"] == two_rows["logps/chosen"]
    assert auto["logps/rejected"] == two_rows["logps/rejected"]


def test_a_reward_model_on_a_windowed_backbone_reads_each_response_in_its_own_row(tmp_path, capsys):
    model_dir, data = windowed_model_and_pairs(tmp_path)

    def run(name, **overrides):
        cfg = RewardConfig(
            model=str(model_dir), data=str(data), output_dir=str(tmp_path / name), max_steps=1, batch_size=4,
            max_length=48, max_prompt_length=32, lr=1e-3, progress=False, report=False, **overrides,
        )  # fmt: skip
        reward_model.train(cfg)
        return train_metrics(cfg)[0]

    auto = run("auto")
    assert "sliding window of 4 tokens is shorter than max_length" in capsys.readouterr().out
    two_rows = run("two", share_prompt=False)
    assert auto["loss"] == two_rows["loss"] and auto["grad_norm"] == two_rows["grad_norm"]
