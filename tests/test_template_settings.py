"""The offline commands (sft, dpo and its vision rows, kto, listwise, reward, offline-rl) take the settings the
online commands pass to the chat template, `system_prompt` and `chat_template_kwargs` (issue 20, item 1): every
rendering of a conversational row gets them, a row's own system message wins, a change of them re-tokenises
the rows, and they are errors where they would do nothing (rows that are all text, a tokenizer with no chat
template).

The template below reads `enable_thinking` as Qwen3's does: with it false, the generation prompt and the final
assistant turn both open with an empty think block."""

from __future__ import annotations

import json

import pytest

from alignkit.config.load import ConfigError
from alignkit.config.preference import DPOConfig, KTOConfig, ListwiseConfig
from alignkit.config.supervised import OfflineRLConfig, RewardConfig, SFTConfig
from alignkit.data import prepare
from alignkit.data.tokenize import encode_prompt_completions
from tests.test_prompts import tokenizer_with

NO_THINKING = "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
THINKING = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}"
    + NO_THINKING
    + "{% endif %}"
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    + NO_THINKING
    + "{% endif %}"
)
SETTINGS = {"system_prompt": "Be kind.", "chat_template_kwargs": {"enable_thinking": False}}
USER = {"role": "user", "content": "Tell me a story."}
OWN_SYSTEM = {"role": "system", "content": "Be terse."}


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


# command -> (its config, its data preparation, a conversational row from prompt messages, the replies' texts)
COMMANDS = {
    "sft": (SFTConfig, prepare.prepare_sft_data, lambda p: {"messages": [*p, reply("Once.")]}),
    "dpo": (
        DPOConfig,
        prepare.prepare_preference_data,
        lambda p: {"prompt": p, "chosen": reply("Once."), "rejected": [reply("No.")]},
    ),
    "reward": (
        RewardConfig,
        prepare.prepare_preference_data,
        lambda p: {"prompt": p, "chosen": reply("Once."), "rejected": reply("No.")},
    ),
    "kto": (
        KTOConfig,
        prepare.prepare_unpaired_data,
        lambda p: {"prompt": p, "completion": reply("Once."), "label": True},
    ),
    "listwise": (
        ListwiseConfig,
        prepare.prepare_listwise_data,
        lambda p: {"prompt": p, "responses": [reply("Once."), reply("No.")], "scores": [1.0, 0.0]},
    ),
    "offline-rl": (
        OfflineRLConfig,
        prepare.prepare_logged_data,
        lambda p: {"prompt": p, "response": reply("Once."), "reward": 1.0},
    ),
}
REPLIES = {"dpo": ["Once.", "No."], "reward": ["Once.", "No."], "listwise": ["Once.", "No."]}


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepared(command: str, tmp_path, tokenizer, rows, out: str = "out", **settings) -> list[dict]:
    config, prepare_data, _ = COMMANDS[command]
    data = write_rows(tmp_path / f"{command}.jsonl", rows)
    cfg = config(model="unused", data=data, output_dir=str(tmp_path / out), **settings)
    train, _ = prepare_data(cfg, tokenizer, log=lambda *a: None)
    return train


def prompt_ids(tokenizer, prompt: str, command: str) -> list[int]:
    """The prompt's ids as the offline tokeniser cuts them from the hand-written rendering."""
    replies = [f"{r}\n" for r in REPLIES.get(command, ["Once."])]  # the template ends each turn with \n
    return encode_prompt_completions(tokenizer, prompt, replies)[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_system_prompt_and_chat_template_kwargs_reach_the_template_of_every_offline_command(
    tmp_path, command
):
    """Each command's tokenised prompt is the hand-written rendering with the setting's system message and
    the template variable applied; a row with its own system message keeps it."""
    tokenizer = tokenizer_with(THINKING)
    row = COMMANDS[command][2]
    first, second = prepared(command, tmp_path, tokenizer, [row([USER]), row([OWN_SYSTEM, USER])], **SETTINGS)
    kind = "<|system|>Be kind.\n<|user|>Tell me a story.\n<|assistant|><think></think>"
    terse = "<|system|>Be terse.\n<|user|>Tell me a story.\n<|assistant|><think></think>"
    assert first["prompt_ids"] == prompt_ids(tokenizer, kind, command)
    assert second["prompt_ids"] == prompt_ids(tokenizer, terse, command)  # the row's own system message wins
    # the control: without the settings the template renders neither
    plain = prepared(command, tmp_path, tokenizer, [row([USER])], out="plain")[0]
    assert plain["prompt_ids"] == prompt_ids(tokenizer, "<|user|>Tell me a story.\n<|assistant|>", command)


def test_changing_the_settings_tokenises_the_rows_again(tmp_path):
    """The tokenised data is cached by its settings: a new system prompt in the same output_dir is not
    served the old system prompt's ids."""
    tokenizer = tokenizer_with(THINKING)
    rows = [{"messages": [USER, reply("Once.")]}]
    for system in ("Be kind.", "Be brief."):
        (example,) = prepared("sft", tmp_path, tokenizer, rows, system_prompt=system)
        expected = f"<|system|>{system}\n<|user|>Tell me a story.\n<|assistant|>"
        assert example["prompt_ids"] == encode_prompt_completions(tokenizer, expected, ["Once.\n"])[0]


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_settings_on_rows_that_are_all_text_are_errors_naming_the_setting(tmp_path, command, setting):
    """Offline (sft's text rows, dpo's HH transcripts) as online (grpo's text prompts): the same error at
    load time, naming the setting given and the file."""
    from tests.test_prompts import online_prompts

    rows = {
        "sft": [{"prompt": "Tell me a story.", "completion": " Once."}],
        "dpo": [
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}
        ],
        "grpo": [{"prompt": "Tell me a story."}],
    }[command]
    given = {setting: SETTINGS[setting]}
    with pytest.raises(ConfigError) as err:
        if command == "grpo":
            online_prompts(tmp_path, tokenizer_with(THINKING), rows, **given)
        else:
            prepared(command, tmp_path, tokenizer_with(THINKING), rows, **given)
    message, name = str(err.value), "prompts" if command == "grpo" else command
    assert f"{setting} is set, but {tmp_path / name}.jsonl has only text rows" in message
    assert ("system_prompt" in message) == (setting == "system_prompt")  # only the setting given is named


def test_chat_template_kwargs_for_a_tokenizer_without_a_chat_template_is_an_error(tmp_path):
    rows = [{"messages": [USER, reply("Once.")]}]
    with pytest.raises(ConfigError, match="chat_template_kwargs .* the tokenizer has no chat template"):
        prepared("sft", tmp_path, tokenizer_with(None), rows, chat_template_kwargs={"enable_thinking": False})
    # a system prompt does work without one: the plain default renders it
    (example,) = prepared("sft", tmp_path, tokenizer_with(None), rows, system_prompt="Be kind.")
    expected = "\n\nSystem: Be kind.\n\nHuman: Tell me a story.\n\nAssistant:"
    assert example["prompt_ids"] == encode_prompt_completions(tokenizer_with(None), expected, [" Once."])[0]


def test_vision_rows_get_the_settings_as_a_text_part(tmp_path):
    """dpo on a vision-language model: the system prompt goes in as a message of text parts, as the row's
    own messages are, and the template variables reach the processor's template."""
    pytest.importorskip("PIL")
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from alignkit.data.vision_rows import prepare_vision_data, read_image
    from tests.test_vlm_dpo import WORDS, word_tokenizer, write_colour_pairs

    dot = "{% if enable_thinking is defined and not enable_thinking %} .{% endif %}"
    template = (  # LLaVA's shape; with enable_thinking false the assistant turn opens with a "."
        "{% for m in messages %}{{ m['role'].upper() }}:{% if m['role'] == 'assistant' %}"
        + dot
        + "{% endif %} "
        "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }} {% endif %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:" + dot + "{% endif %}"
    )
    tok = word_tokenizer(["<image>"], [*WORDS, "USER:", "ASSISTANT:", "SYSTEM:"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        tokenizer=tok,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    data = write_colour_pairs(tmp_path, n=1)
    settings = {"system_prompt": "a picture", "chat_template_kwargs": {"enable_thinking": False}}
    cfg = DPOConfig(model="unused", data=str(data), output_dir=str(tmp_path / "out"), **settings)
    (example,), _ = prepare_vision_data(cfg, processor, log=lambda *a: None)
    prompt = "SYSTEM: a picture USER: <image> what colour is this ASSISTANT: ."
    image = read_image(str(tmp_path / "img" / "red.png"))
    assert example["prompt_ids"] == list(processor(text=[prompt], images=[image])["input_ids"][0])


def test_diffusion_dpo_refuses_the_settings(tmp_path):
    from alignkit.algorithms.diffusion_dpo import check_settings
    from alignkit.config.preference import DiffusionDPOConfig

    for setting, value in SETTINGS.items():
        with pytest.raises(ConfigError, match=f"{setting} is not used by diffusion-dpo"):
            check_settings(DiffusionDPOConfig(**{setting: value}))


def test_iterative_dpo_rounds_train_on_their_pairs_as_rendered(tmp_path):
    """iterative-dpo renders its prompts with the settings when it samples; a round's DPO run trains on the
    pairs it wrote (text, pre-tokenised), which the settings must not be applied to again (nor refused)."""
    from alignkit.algorithms.iterative import round_config
    from alignkit.config.preference import IterativeDPOConfig

    tokenizer = tokenizer_with(THINKING)
    rendered = "<|system|>Be kind.\n<|user|>Tell me a story.\n<|assistant|><think></think>"
    ids = tokenizer(rendered)["input_ids"]
    pair = {"prompt": rendered, "chosen": "Once.", "rejected": "No.", "prompt_ids": ids}
    pairs = write_rows(tmp_path / "pairs.jsonl", [{**pair, "chosen_ids": [5, 2], "rejected_ids": [6, 2]}])
    cfg = IterativeDPOConfig(model="m", data="prompts.jsonl", output_dir=str(tmp_path / "run"), **SETTINGS)
    run = round_config(cfg, 1, "m", tmp_path / "pairs.jsonl")
    assert run.data == pairs
    (example,), _ = prepare.prepare_preference_data(run, tokenizer, log=lambda *a: None)
    assert (example["prompt_ids"], example["chosen_ids"]) == (ids, [5, 2])
