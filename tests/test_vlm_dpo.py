"""DPO on vision-language models (alignkit.data.vision_rows, alignkit.models.vision) and mDPO, with tiny random LLaVA and
Qwen2-VL models built here: word-level tokenizers built with `tokenizers`, image processors constructed in
code, 8-pixel PNG images written by the test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.config.preference import DPOConfig

pytest.importorskip("PIL")

WORDS = ["what", "colour", "is", "this", "red", "blue", "green", "it", "a", "picture", "."]
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
# Chat templates in the models' own shapes: an image part becomes the processor's placeholder.
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    " {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
QWEN_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def word_tokenizer(specials: list[str], words: list[str]):
    """A whitespace word-level fast tokenizer: <pad> <unk> <s> </s>, the words, then `specials`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def text_config(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def build_llava(
    path: Path,
    seed: int = 0,
    *,
    image_size: int = 8,
    patch: int = 2,
    hidden: int = 32,
    vision_hidden: int = 16,
    vision_layers: int = 1,
) -> Path:
    """A random LLaVA (CLIP vision tower: patch 2 on 8-px images -> 16 image tokens; Llama text model), or
    a larger one for benchmarks/vlm_image_encoding.py."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = word_tokenizer(["<image>"], [*WORDS, "USER:", "ASSISTANT:"])
    size = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    text = {**text_config(len(tok)), "hidden_size": hidden, "intermediate_size": 2 * hidden}
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_qwen2vl(path: Path, seed: int = 0) -> Path:
    """A random Qwen2-VL (patch 2, 2x2 merge: an 8-px image, resized to 8x8, gives 4 image tokens)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from alignkit.data.vision_rows import image_only_processor

    tok = word_tokenizer(QWEN_SPECIALS, [*WORDS, "user", "assistant"])
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=16, max_pixels=64
    )
    # Without torchvision a Qwen2VLProcessor cannot build its video processor; images need none.
    processor = image_only_processor(Qwen2VLProcessor, image_processor, tok, QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={**text_config(len(tok)), "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config=dict(
            depth=1,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


BUILDERS = {"llava": build_llava, "qwen2vl": build_qwen2vl}
IMAGE_TOKENS = {"llava": 16, "qwen2vl": 4}  # (8/2)^2 CLIP patches; (8/2)^2 patches / 2x2 merge


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, BUILDERS[name](tmp_path_factory.mktemp(name))


def write_colour_pairs(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """n rows asking for the colour of an 8x8 PNG: chosen names it, rejected names another colour."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(folder / "img" / f"{colour}.png")
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        wrong = rng.choice([c for c in COLOURS if c != colour])
        rows.append(
            {
                "images": [f"img/{colour}.png"],
                "prompt": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "what colour is this"}],
                    }
                ],
                "chosen": {"role": "assistant", "content": f" it is {colour} ."},
                "rejected": {"role": "assistant", "content": f" it is {wrong} ."},
            }
        )
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vlm_config(model: Path, data: Path, out: Path, **overrides) -> DPOConfig:
    settings = dict(
        model=str(model),
        data=str(data),
        output_dir=str(out),
        batch_size=6,
        lr=1e-2,
        warmup_ratio=0.0,
        beta=1.0,
        max_steps=20,
        save_steps=0,
        report=False,
        progress=False,
        seed=0,
    )
    return DPOConfig(**{**settings, **overrides})


def train_losses(cfg) -> list[dict]:
    from alignkit.algorithms.dpo import train
    from tests.conftest import train_metrics

    train(cfg)
    return train_metrics(cfg)


def test_boundary_and_image_token_counts(vlm, tmp_path):
    """The prompt's image placeholder expands to the model's count (LLaVA 16, Qwen2-VL 4); the expanded
    prompt is exactly the processor's ids for the prompt; the completion mask covers the response tokens
    (and EOS) and nothing of the prompt; Qwen2-VL's mm_token_type_ids mark the image tokens."""
    from alignkit.data.vision_rows import (
        collate_vision_pairs,
        image_token_count,
        load_processor,
        load_vision_rows,
        read_image,
        tokenize_vision_rows,
    )

    name, model = vlm
    processor = load_processor(str(model))
    data = write_colour_pairs(tmp_path, n=3)
    rows = load_vision_rows(str(data), None, processor).rows
    examples, _ = tokenize_vision_rows(rows, processor, max_length=128, max_prompt_length=64)
    tok = processor.tokenizer
    for row, e in zip(rows, examples):
        assert image_token_count(processor, e["prompt_ids"]) == IMAGE_TOKENS[name]
        expected = processor(text=[row.prompt], images=[read_image(r) for r in row.images])["input_ids"][0]
        assert e["prompt_ids"] == list(expected)
        colour = Path(row.images[0]).stem
        assert row.chosen.split() == ["it", "is", colour, "."] + (["<|im_end|>"] if name == "qwen2vl" else [])
        assert e["chosen_ids"] == tok(row.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate_vision_pairs(examples, tok.pad_token_id, processor=processor)
    B = len(examples)
    for r in range(2 * B):
        e = examples[r % B]
        P, C = len(e["prompt_ids"]), len(e["chosen_ids"] if r < B else e["rejected_ids"])
        assert batch["completion_mask"][r].nonzero().flatten().tolist() == list(range(P, P + C))
    assert batch["image_order"].tolist() == [0, 1, 2, 0, 1, 2]
    if name == "qwen2vl":
        assert batch["mm_token_type_ids"].sum(1).tolist() == [4] * (2 * B)
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * B


def test_truncation_that_would_cut_image_tokens_is_an_error(vlm, tmp_path):
    from alignkit.data.readers import DataError
    from alignkit.data.vision_rows import load_processor, load_vision_rows, tokenize_vision_rows

    name, model = vlm
    processor = load_processor(str(model))
    data = write_colour_pairs(tmp_path, n=2)
    rows = load_vision_rows(str(data), None, processor).rows
    with pytest.raises(
        DataError, match=r"pairs.jsonl:1-2: field 'prompt': .*image tokens.*Raise max_prompt_length"
    ):
        tokenize_vision_rows(rows, processor, max_length=64, max_prompt_length=IMAGE_TOKENS[name])


def test_bad_image_rows_are_reported_with_file_and_line(vlm, tmp_path):
    from alignkit.data.readers import DataError
    from alignkit.data.vision_rows import load_processor, load_vision_rows

    processor = load_processor(str(vlm[1]))
    data = write_colour_pairs(tmp_path, n=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["images"] = ["img/missing.png"]
    rows[1]["images"] = ["img/red.png", "img/blue.png"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_vision_rows(str(data), None, processor)
    assert "pairs.jsonl:1: field 'images[0]': no image file" in str(err.value)
    assert "pairs.jsonl:2: field 'images': 2 images for 1 {type: image} parts" in str(err.value)


def test_dpo_lowers_the_loss_on_a_learnable_image_task(vlm, tmp_path):
    """The chosen answer names the image's colour, the rejected one another colour (so only the image tells
    them apart): 20 steps take the loss from ln 2 to under 0.45 (mean of the last 5). The vision tower and
    projector are frozen (freeze_vision default): their saved weights equal the initial ones."""
    from safetensors.torch import load_file

    from alignkit.models.vision import VISION_MODULES

    name, model = vlm
    cfg = vlm_config(model, write_colour_pairs(tmp_path / "data"), tmp_path / "out")
    metrics = train_losses(cfg)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    last = metrics[-5:]
    assert sum(m["loss"] for m in last) / 5 < 0.45
    assert sum(m["rewards/accuracies"] for m in last) / 5 > 0.75
    before, after = (
        load_file(str(model / "model.safetensors")),
        load_file(f"{cfg.output_dir}/final/model.safetensors"),
    )
    vision = [k for k in before if any(part in VISION_MODULES for part in k.split("."))]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    text = [k for k in before if k not in vision and "layers.0.self_attn.q_proj" in k]
    assert text and not any(torch.equal(before[k], after[k]) for k in text)


def test_precomputed_reference_equals_on_the_fly(vlm, tmp_path):
    """reference.mode=precomputed and copy give the same losses and rewards, step by step (mDPO on, so the
    corrupted-image reference log-probs are compared too)."""
    name, model = vlm
    data = write_colour_pairs(tmp_path / "data", n=12)
    runs = {}
    for mode in ("precomputed", "copy"):
        cfg = vlm_config(model, data, tmp_path / mode, max_steps=3, mdpo=True, mdpo_corruption="mask")
        cfg.reference.mode = mode
        runs[mode] = train_losses(cfg)
    for a, b in zip(runs["precomputed"], runs["copy"]):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/corrupt_chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_each_pair_s_images_are_encoded_once(tmp_path_factory, tmp_path):
    """The vision tower sees B images for B pairs (not 2B), and the log-probs equal those of the plain
    forward that encodes each row's image separately."""
    from alignkit.algorithms.dpo import pair_logps
    from alignkit.data.vision_rows import collate_vision_pairs, load_processor, prepare_vision_data
    from alignkit.models.load import load_causal_lm

    model_dir = build_llava(tmp_path_factory.mktemp("llava-once"), seed=1)
    processor = load_processor(str(model_dir))
    cfg = vlm_config(model_dir, write_colour_pairs(tmp_path / "data", n=4), tmp_path / "out")
    examples, _ = prepare_vision_data(cfg, processor, log=lambda *a: None)
    batch = collate_vision_pairs(examples, processor.tokenizer.pad_token_id, processor=processor)
    model = load_causal_lm(str(model_dir)).eval()
    seen = []
    model.model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        shared = pair_logps(model, batch)
        plain = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1),
        ).logits.log_softmax(-1)
    assert seen == [4, 8]
    ids, mask = batch["input_ids"], batch["completion_mask"]
    token_logps = plain[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    torch.testing.assert_close(shared["chosen"], token_logps.sum(1)[:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared["rejected"], token_logps.sum(1)[4:], rtol=0, atol=1e-5)


def test_mdpo_terms_match_a_hand_computation():
    """β = 0.5; chosen log-probs under the real image −4, −6, under the corrupted one −5, −5; reference −5 and
    −5 under both. r(y_w|m) = 0.5·(−4+5) = 0.5 and 0.5·(−6+5) = −0.5; r(y_w|m') = 0 for both.
    conditional: −log σ(0.5) = 0.474077, −log σ(−0.5) = 0.974077; anchor: the same two values, so the
    per-pair totals are 0.948154 and 1.948154; the conditional accuracy is 1/2, the margin mean 0."""
    from alignkit.losses.mdpo import mdpo_terms

    losses, metrics = mdpo_terms(
        torch.tensor([-4.0, -6.0]),
        torch.tensor([-5.0, -5.0]),
        torch.tensor([-5.0, -5.0]),
        torch.tensor([-5.0, -5.0]),
        beta=0.5,
    )
    torch.testing.assert_close(losses, torch.tensor([0.948154, 1.948154]), rtol=0, atol=1e-6)
    assert float(metrics["mdpo/conditional_loss"]) == pytest.approx((0.474077 + 0.974077) / 2, abs=1e-6)
    assert float(metrics["mdpo/conditional_accuracy"]) == 0.5
    assert float(metrics["mdpo/conditional_margin"]) == pytest.approx(0.0, abs=1e-7)


def test_mdpo_run_starts_at_three_ln2_and_logs_its_metrics(tmp_path_factory, tmp_path):
    """At step 0 policy = reference, so each of DPO, the conditional and the anchor term is ln 2."""
    model_dir = build_llava(tmp_path_factory.mktemp("llava-mdpo"), seed=2)
    cfg = vlm_config(
        model_dir, write_colour_pairs(tmp_path / "data", n=6), tmp_path / "out", max_steps=2, mdpo=True
    )
    metrics = train_losses(cfg)
    assert metrics[0]["loss"] == pytest.approx(3 * math.log(2), abs=1e-5)
    assert metrics[0]["mdpo/anchor_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert {"mdpo/conditional_loss", "mdpo/conditional_accuracy", "rewards/corrupt_chosen"} <= set(metrics[1])


def test_corrupt_image_is_seeded_and_keeps_the_size():
    from PIL import Image

    from alignkit.data.vision_rows import corrupt_image

    image = Image.new("RGB", (16, 8), (255, 0, 0))
    image.paste((0, 0, 255), (8, 0, 16, 8))  # left half red, right half blue
    a, b, c = (corrupt_image(image, s, "crop", 0.2) for s in (7, 7, 8))
    assert a.size == image.size and a.tobytes() == b.tobytes() != c.tobytes()
    masked = corrupt_image(image, 7, "mask", 0.2)
    black = int((torch.tensor(list(masked.tobytes())).view(-1, 3).sum(1) == 0).sum())
    assert 0.8 * 128 <= black < 128  # all but a box of at most 20% of the area


def test_vision_settings_on_a_text_model_are_errors(tiny_model_dir, tmp_path):
    from alignkit.algorithms.dpo import train
    from alignkit.config.load import ConfigError

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    cfg = DPOConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "o"), mdpo=True)
    with pytest.raises(ConfigError, match="mdpo=True is for vision-language models"):
        train(cfg)
    assert not (tmp_path / "o").exists()  # refused before the run claimed its output folder


def test_lora_adapter_off_reference_equals_precomputed(tmp_path_factory, tmp_path):
    """With LoRA, reference.mode=adapter (the base with the adapter switched off) gives the losses of the
    precomputed reference; LoRA layers that "all-linear" put in the vision tower stay frozen."""
    model_dir = build_qwen2vl(tmp_path_factory.mktemp("qwen-lora"), seed=3)
    data = write_colour_pairs(tmp_path / "data", n=12)
    runs = {}
    for mode in ("precomputed", "adapter"):
        cfg = vlm_config(model_dir, data, tmp_path / mode, max_steps=3)
        cfg.lora.enabled, cfg.lora.dropout, cfg.reference.mode = True, 0.0, mode
        runs[mode] = train_losses(cfg)
    for a, b in zip(runs["precomputed"], runs["adapter"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert runs["adapter"][-1]["loss"] < math.log(2)
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "adapter" / "final" / "adapter_model.safetensors"))
    vision_b = [v for k, v in adapter.items() if ".visual." in k and "lora_B" in k]
    text_b = [v for k, v in adapter.items() if ".language_model." in k and "lora_B" in k]
    assert vision_b and all(not v.any() for v in vision_b)  # still at LoRA's zero start: frozen
    assert text_b and any(v.any() for v in text_b)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_share_prompt_row_gives_the_two_row_log_probs(name, tmp_path_factory, tmp_path):
    """share_prompt: one [prompt | chosen | rejected] row per pair (image and prompt tokens computed once)
    gives the log-probs of the two-row layout, for LLaVA and for Qwen2-VL, whose multimodal-RoPE positions
    (image tokens on their grid) are rebuilt per segment (`vision.mrope_positions`)."""
    from alignkit.algorithms.dpo import pair_logps
    from alignkit.data.vision_rows import (
        collate_vision_pairs,
        collate_vision_shared_prompt,
        load_processor,
        prepare_vision_data,
    )
    from alignkit.models.load import load_causal_lm
    from alignkit.models.vision import uses_mrope

    model_dir = BUILDERS[name](tmp_path_factory.mktemp(f"{name}-share"), seed=4)
    processor = load_processor(str(model_dir))
    data = write_colour_pairs(tmp_path / "data", n=4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["chosen"]["content"] = " it is blue . it is a picture ."  # completions of different lengths
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = vlm_config(model_dir, data, tmp_path / "out")
    examples, _ = prepare_vision_data(cfg, processor, log=lambda *a: None)
    pad = processor.tokenizer.pad_token_id
    one_row = collate_vision_shared_prompt(examples, pad, processor=processor)
    two_rows = collate_vision_pairs(examples, pad, processor=processor)
    assert one_row["input_ids"].shape[0] <= 4 and two_rows["input_ids"].shape[0] == 8
    model = load_causal_lm(str(model_dir)).eval()
    with torch.no_grad():
        a, b = pair_logps(model, one_row), pair_logps(model, two_rows)
    for key in ("chosen", "rejected", "n_chosen", "n_rejected"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert uses_mrope(str(model_dir)) == (name == "qwen2vl")


@pytest.mark.parametrize("example", ["llava", "qwen2vl"])
def test_shipped_example_configs_run_on_a_tiny_model(example, tmp_path_factory, tmp_path):
    """examples/vlm_dpo/<model>.yaml with its shipped rows and images, the real model swapped for the tiny
    one of the same family and the run shrunk: it loads, validates and trains (LLaVA's: LoRA, adapter-off
    reference, one row per pair)."""
    from alignkit.config.load import load_config
    from tests.conftest import REPO

    model_dir = BUILDERS[example](tmp_path_factory.mktemp(f"{example}-example"), seed=5)
    path = REPO / "examples" / "vlm_dpo" / f"{example}.yaml"
    shrink = [f"model={model_dir}", f"output_dir={tmp_path}", "dtype=float32", "max_steps=2", "batch_size=4"]
    shrink += ["grad_accum=1", "max_prompt_length=64", "max_length=96", "report=false", "progress=false"]
    cfg = load_config(DPOConfig, str(path), shrink)
    cfg.data = str(REPO / cfg.data)
    metrics = train_losses(cfg)
    assert len(metrics) == 2 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_base64_images_give_the_examples_of_image_files(tmp_path):
    """An image given as a data URI or as bare base64 is the image its file holds: same tokens, same pixels."""
    import base64

    from alignkit.data.vision_rows import (
        collate_vision_pairs,
        load_processor,
        load_vision_rows,
        tokenize_vision_rows,
    )

    model_dir = build_qwen2vl(tmp_path / "model", seed=6)
    processor = load_processor(str(model_dir))
    data = write_colour_pairs(tmp_path / "data", n=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    inline = []
    for row, how in zip(rows, ("uri", "bare")):
        raw = base64.b64encode((data.parent / row["images"][0]).read_bytes()).decode()
        inline.append({**row, "images": [f"data:image/png;base64,{raw}" if how == "uri" else raw]})
    (tmp_path / "inline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inline))
    batches = []
    for source in (data, tmp_path / "inline.jsonl"):
        loaded = load_vision_rows(str(source), None, processor).rows
        examples, _ = tokenize_vision_rows(loaded, processor, max_length=64, max_prompt_length=32)
        batches.append(collate_vision_pairs(examples, processor.tokenizer.pad_token_id, processor=processor))
    files, inlined = batches
    assert files.keys() == inlined.keys()
    for key in files:
        assert torch.equal(files[key], inlined[key]), key
