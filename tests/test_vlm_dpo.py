"""DPO on vision-language models (alignkit.data.vision, alignkit.vision) and mDPO, with tiny random LLaVA and
Qwen2-VL models built here: word-level tokenizers built with `tokenizers`, image processors constructed in
code, 8-pixel PNG images written by the test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.config import DPOConfig

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
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


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


def build_llava(path: Path, seed: int = 0) -> Path:
    """A random LLaVA (CLIP vision tower: patch 2 on 8-px images -> 16 image tokens; Llama text model)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = word_tokenizer(["<image>"], [*WORDS, "USER:", "ASSISTANT:"])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=2
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_config(len(tok))),
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

    from alignkit.data.vision import image_only_processor

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
            depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3,
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
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this"}]}],
                "chosen": {"role": "assistant", "content": f" it is {colour} ."},
                "rejected": {"role": "assistant", "content": f" it is {wrong} ."},
            }
        )
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
