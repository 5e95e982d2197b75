"""The one prompt encoder (issue 20, item 1): one BOS whatever the chat template writes, in every command
that encodes prompts; a conversational prompt over max_prompt_length refused (or dropped) at its row, a
text one cut from the left with its BOS kept; the system prompt and chat_template_kwargs reach the template.

The shipped TinyStories tokenizer adds its BOS (<|start_story|>, id 1) when asked for special tokens; the
templates below are given to it in each test, one writing {{ bos_token }} as Llama 3, Gemma and Mistral
templates do, one not (as Qwen's)."""

from __future__ import annotations

import json

import pytest

from alignkit.config.generation import GenerationSettings
from alignkit.data.readers import DataError
from alignkit.models.load import load_tokenizer
from tests.conftest import TINYSTORIES

BOS = 1
TURNS = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WRITES_BOS = "{{ bos_token }}" + TURNS  # Llama 3 / Gemma / Mistral style
NO_BOS = TURNS  # Qwen style
THINKING = (  # Qwen3 style: a template variable the caller sets through chat_template_kwargs
    TURNS + "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}"
)


def tokenizer_with(template: str | None):
    tokenizer = load_tokenizer(str(TINYSTORIES))
    tokenizer.chat_template = template
    return tokenizer


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conversation(text: str) -> dict:
    return {"prompt": [{"role": "user", "content": text}]}


def online_prompts(tmp_path, tokenizer, rows, **settings):
    from alignkit.config.online import GRPOConfig
    from alignkit.data.prompts import load_prompts

    cfg = GRPOConfig(
        data=write_rows(tmp_path / "prompts.jsonl", rows), output_dir=str(tmp_path / "out"), **settings
    )
    return load_prompts(cfg, tokenizer, log=lambda *a: None)


@pytest.mark.parametrize("template", [WRITES_BOS, NO_BOS], ids=["template-writes-bos", "template-without"])
def test_every_command_encodes_a_chat_prompt_with_exactly_one_bos(tmp_path, tiny_model_dir, template):
    """grpo/rloo/ppo/online-dpo/iterative-dpo/distill (load_prompts), generate (best_of_n), eval and the
    local judge (generation.sample) and ICDPO's demonstrations: one BOS at the front, never two."""
    from alignkit.generation.sampling import sample
    from alignkit.inference.best_of_n import sample_candidates
    from alignkit.inference.icdpo import demonstration_ids
    from alignkit.models.load import load_causal_lm

    tokenizer = tokenizer_with(template)
    prompts = online_prompts(tmp_path, tokenizer, [conversation("Tell me a story."), {"prompt": "Once"}])
    rendered = prompts.train_rows[0].prompt
    assert rendered.startswith("<|start_story|>") == (template is WRITES_BOS)
    for ids in prompts.train_ids:
        assert ids[0] == BOS and ids[1] != BOS, ids[:3]

    model = load_causal_lm(str(tiny_model_dir)).eval()
    (drawn,) = sample(model, tokenizer, [rendered], max_new_tokens=2, seed=0)
    assert drawn.prompt_ids == prompts.train_ids[0]
    (candidates,) = sample_candidates(model, tokenizer, [rendered], n=1, max_new_tokens=2)
    assert candidates.prompt_ids == prompts.train_ids[0]
    (demo,) = demonstration_ids([rendered], [" The end."], tokenizer)
    assert demo[0] == BOS and demo[1] != BOS


def test_a_conversational_prompt_over_max_prompt_length_is_refused_or_dropped_at_its_row(tmp_path):
    """Cut from the left, a chat prompt loses its BOS, system message and template header (TRL's
    truncation); here it is refused naming file:line (on_bad_rows=skip: dropped and listed)."""
    tokenizer = tokenizer_with(WRITES_BOS)
    long = "The little dog ran and ran and ran down the long road to the big red barn. " * 4
    rows = [conversation("Hi."), conversation(long), conversation("Tell me a story.")]
    with pytest.raises(DataError) as info:
        online_prompts(tmp_path, tokenizer, rows, max_prompt_length=32)
    path = tmp_path / "prompts.jsonl"
    assert f"{path}:2: field 'prompt'" in str(info.value) and "max_prompt_length=32" in str(info.value)

    prompts = online_prompts(tmp_path, tokenizer, rows, max_prompt_length=32, on_bad_rows="skip")
    assert [r.line for r in prompts.train_rows] == [1, 3]
    assert all(ids[0] == BOS and len(ids) <= 32 for ids in prompts.train_ids)
    dropped = [json.loads(x) for x in (tmp_path / "out" / "dropped_rows.jsonl").read_text().splitlines()]
    assert [d["line"] for d in dropped] == [2] and "max_prompt_length" in dropped[0]["reason"]


def test_a_text_prompt_over_max_prompt_length_keeps_its_bos_and_its_end(tmp_path):
    tokenizer = tokenizer_with(None)
    text = "Once upon a time there was a little girl named Lily who loved to play in the sun."
    full = tokenizer(text)["input_ids"]
    assert full[0] == BOS and len(full) > 12
    prompts = online_prompts(tmp_path, tokenizer, [{"prompt": text}], max_prompt_length=12)
    assert prompts.train_ids[0] == [BOS] + full[-11:]  # the end, where the completion starts, is kept


def test_system_prompt_and_chat_template_kwargs_reach_the_template(tmp_path):
    tokenizer = tokenizer_with(THINKING)
    rows = [
        conversation("Hi."),
        {"prompt": [{"role": "system", "content": "Be terse."}, conversation("Yo.")["prompt"][0]]},
    ]
    settings = {"system_prompt": "Be kind.", "chat_template_kwargs": {"enable_thinking": False}}
    prompts = online_prompts(tmp_path, tokenizer, rows, **settings)
    first, second = (r.prompt for r in prompts.train_rows)
    assert first == "<|system|>Be kind.\n<|user|>Hi.\n<|assistant|><think></think>"
    assert second == "<|system|>Be terse.\n<|user|>Yo.\n<|assistant|><think></think>"  # its own kept
    assert prompts.train_ids[0] == tokenizer(first)["input_ids"]  # (this template writes no BOS)


def test_the_local_judge_passes_chat_template_kwargs_and_encodes_one_bos(
    tmp_path, tiny_model_dir, monkeypatch
):
    import shutil

    import alignkit.generation.sampling
    from alignkit.rewards.backends import LocalChatBackend

    judge_dir = tmp_path / "judge"
    shutil.copytree(tiny_model_dir, judge_dir)
    tokenizer = tokenizer_with(WRITES_BOS + THINKING[len(TURNS) :])
    tokenizer.save_pretrained(judge_dir)
    backend = LocalChatBackend(
        str(judge_dir), max_new_tokens=2, chat_template_kwargs={"enable_thinking": False}
    )
    seen = []
    real = alignkit.generation.sampling.sample
    monkeypatch.setattr(
        alignkit.generation.sampling, "sample", lambda *a, **k: seen.extend(real(*a, **k)) or seen
    )
    list(backend.complete([[{"role": "user", "content": "Score this."}]]))
    assert seen[0].prompt.endswith("<|assistant|><think></think>")
    assert seen[0].prompt_ids[0] == BOS and seen[0].prompt_ids[1] != BOS


RM_TEMPLATE = (  # the reward model's own template: unlike the policy's, and it writes its BOS too
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)


def test_rewards_read_the_conversation_in_their_own_template_or_its_content(tmp_path, tiny_model_dir):
    """alignkit generate on a conversational prompt, policy template <|user|>..., scored by a tiny reward
    model with its own template [user] ... and by a regex over {prompt}: the reward model's score is its
    logit on its own rendering of prompt messages + the candidate as the assistant's reply (one BOS), as
    TRL does; the regex sees the user's words, not the policy's markup. Before, both read the policy's
    rendered text (the reward model its response alone, the regex '<|start_story|><|user|>...')."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignkit.config.tools import GenerateConfig
    from alignkit.inference.best_of_n import run

    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    tokenizer_with(WRITES_BOS).save_pretrained(policy)
    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    reward_model = LlamaForSequenceClassification(config).eval()
    reward_model.save_pretrained(rm_dir, safe_serialization=True)
    rm_tokenizer = tokenizer_with(RM_TEMPLATE)
    rm_tokenizer.save_pretrained(rm_dir)

    messages = [{"role": "user", "content": "Tell me a story."}]
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": messages}])
    rewards = [
        {"type": "classifier", "model": str(rm_dir)},
        {"type": "regex", "pattern": r"^Tell me a story\.$", "text": "{prompt}"},
    ]
    cfg = GenerateConfig(
        model=str(policy), prompts=prompts, rewards=rewards, n=3, generation=GenerationSettings(max_new_tokens=6), progress=False,
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    run(cfg)
    (line,) = [json.loads(x) for x in open(tmp_path / "out" / "candidates.jsonl")]
    for candidate in line["candidates"]:
        conversation = [*messages, {"role": "assistant", "content": candidate["text"]}]
        text = rm_tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = rm_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[0] == BOS and ids[1] != BOS
        with torch.no_grad():
            expected = float(reward_model(torch.tensor([ids])).logits[0, 0])
        assert candidate["scores"]["classifier"] == pytest.approx(expected, abs=1e-5)
        assert candidate["scores"]["regex"] == 1.0


def test_online_rollouts_give_rewards_the_conversation_not_the_policys_markup(tmp_path, tiny_model_dir):
    """The rollout of grpo / rloo / ppo / online-dpo / iterative-dpo (here its eval, `evaluate_policy`,
    which collects like a training step) hands the reward sources the row's messages: a regex over
    {prompt} finds the user's words at the start, not '<|start_story|><|user|>'."""
    import dataclasses

    from alignkit.config.online import GRPOConfig
    from alignkit.evaluation.policy import evaluate_policy
    from alignkit.models.load import load_causal_lm
    from alignkit.rewards import RewardSet
    from alignkit.rollout import sampling_settings

    tokenizer = tokenizer_with(WRITES_BOS)
    prompts = online_prompts(tmp_path, tokenizer, [conversation("Tell me a story.")])
    prompts = dataclasses.replace(prompts, eval_rows=prompts.train_rows, eval_ids=prompts.train_ids)
    rewards = RewardSet.from_specs([{"type": "regex", "pattern": r"^Tell me a story\.$", "text": "{prompt}"}])
    model = load_causal_lm(str(tiny_model_dir)).eval()
    sampling = sampling_settings(GRPOConfig(generation=GenerationSettings(max_new_tokens=2)))
    assert (
        evaluate_policy(model, tokenizer, prompts, rewards, sampling=sampling, seed=0)["rewards/regex/mean"]
        == 1.0
    )


def test_a_tokenizer_set_to_append_eos_gives_causal_prompts_without_it(tmp_path):
    """A tokenizer set to append EOS (add_eos_token=True, as some Llama / Mistral checkpoints ship) puts one
    after every text it encodes. A causal policy continues its prompt, so the prompt must not end in an EOS:
    text and chat prompts alike end where their text ends, as the offline path's prompts do. An
    encoder-decoder's source (PPO on T5) keeps it: T5 was trained on inputs ending in its EOS."""
    from alignkit.config.online import PPOConfig
    from alignkit.data.prompts import encode_prompt, load_prompts

    tokenizer = tokenizer_with(NO_BOS)
    tokenizer.add_bos_token, tokenizer.add_eos_token = True, True
    eos, text = tokenizer.eos_token_id, "Once upon a time"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text)["input_ids"] == [BOS, *plain, eos]  # the setting is on
    chat = "<|user|>Hi.\n<|assistant|>"
    chat_plain = tokenizer(chat, add_special_tokens=False)["input_ids"]

    prompts = online_prompts(tmp_path, tokenizer, [{"prompt": text}, conversation("Hi.")])
    assert prompts.train_ids == [[BOS, *plain], [BOS, *chat_plain]]
    assert encode_prompt(tokenizer, text) == [BOS, *plain]  # generate, eval, the local judge, ICDPO
    # an encoder-decoder's source keeps what its tokenizer appends
    rows = write_rows(tmp_path / "source.jsonl", [{"prompt": text}])
    cfg = PPOConfig(data=rows, output_dir=str(tmp_path / "ppo"))
    source = load_prompts(cfg, tokenizer, log=lambda *a: None, encoder_decoder=True)
    assert source.train_ids == [[BOS, *plain, eos]]


@pytest.mark.parametrize("policy", ["tiny_model_dir", "tiny_t5_dir"])
def test_ppo_encodes_its_prompts_as_its_policy_reads_them(tmp_path, policy, request, monkeypatch):
    """ppo (the one command with encoder-decoder policies) asks for sources that keep their EOS for a T5
    policy, and for prompts that end at their text for a causal one."""
    from alignkit.algorithms import ppo
    from alignkit.config.online import PPOConfig
    from tests.conftest import write_prompts

    class Loaded(Exception):
        pass

    asked = {}

    def load_prompts(cfg, tokenizer, log=print, *, encoder_decoder=False, columns=()):
        asked["encoder_decoder"] = encoder_decoder
        raise Loaded  # nothing after the prompts is under test

    monkeypatch.setattr(ppo, "load_prompts", load_prompts)
    cfg = PPOConfig(
        model=str(request.getfixturevalue(policy)),
        data=write_prompts(tmp_path / "prompts.jsonl"),
        output_dir=str(tmp_path / "out"),
        rewards=[{"type": "regex", "pattern": "e", "mode": "count"}],
    )
    with pytest.raises(Loaded):
        ppo.train(cfg)
    assert asked == {"encoder_decoder": policy == "tiny_t5_dir"}
