"""VLM DPO on the families whose extra inputs tests/test_vlm_dpo.py does not cover: LLaVA-NeXT (`image_sizes`;
anyres tiling makes an image's token count depend on its size), and the Gemma-style `token_type_ids` of
Gemma 3 (its image tokens attend to each other both ways) and PaliGemma (prefix-LM: images and prompt
attend both ways, the completion causally). Tiny random models built here, with the word-level tokenizers,
colour task and training helpers of tests/test_vlm_dpo.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.test_vlm_dpo import (
    LLAVA_TEMPLATE,
    WORDS,
    text_config,
    train_losses,
    vlm_config,
    word_tokenizer,
    write_colour_pairs,
)

pytest.importorskip("PIL")

GEMMA3_SPECIALS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image> {% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    " <end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model{% endif %}"
)
# PaliGemma has no chat turns: the prompt is its images and text.
PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}"
)
# The vision towers (CLIP, SigLIP): patch 2 on 8-px images, one layer of width 16.
TOWER = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=8,
    patch_size=2,
)
# LLaVA-NeXT's anyres: the image is fitted to the best of these (height, width) grids of 8-px tiles.
GRID_PINPOINTS = [[8, 16], [16, 8], [16, 16]]


def build_llava_next(path: Path, seed: int = 0) -> Path:
    """A random LLaVA-NeXT: CLIP tower (patch 2 on 8-px tiles: 16 features a tile, CLS dropped), Llama text
    model, anyres over GRID_PINPOINTS."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = word_tokenizer(["<image>"], [*WORDS, "USER:", "ASSISTANT:"])
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, image_grid_pinpoints=GRID_PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    vision = CLIPVisionConfig(**TOWER)
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_config(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    LlavaNextForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_gemma3(path: Path, seed: int = 0) -> Path:
    """A random Gemma 3: SigLIP tower (patch 2 on 8-px images, 4x4 patches average-pooled to 4 image tokens),
    Gemma 3 text model (one sliding-window layer, one global)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # Gemma 3's processor reads the image tokens from the tokenizer's boi/eoi/image_token attributes.
    word_tokenizer(GEMMA3_SPECIALS, [*WORDS, "user", "model"]).save_pretrained(path / "tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(
        path / "tokenizer",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 8, "width": 8}),
        tokenizer=tok,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=4,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    vision = SiglipVisionConfig(**TOWER)
    text = {**text_config(len(tok)), "head_dim": 8, "sliding_window": 8}
    text["layer_types"] = ["sliding_attention", "full_attention"]
    torch.manual_seed(seed)
    config = Gemma3Config(
        vision_config=vision.to_dict(),
        text_config=text,
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers starts the projection at zero (every image the same); a trained model's is not.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_paligemma(path: Path, seed: int = 0) -> Path:
    """A random PaliGemma: SigLIP tower (patch 2 on 8-px images: 16 image tokens), Gemma text model; its
    processor puts <bos> after the image tokens and a newline after the prompt (the prefix), as PaliGemma
    was trained."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = word_tokenizer(["<image>"], WORDS)
    image_processor = SiglipImageProcessorPil(size={"height": 8, "width": 8})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE
    )
    vision = SiglipVisionConfig(**TOWER)
    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config={**text_config(len(tok)), "head_dim": 8},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32,
    )
    PaliGemmaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


BUILDERS = {"llava_next": build_llava_next, "gemma3": build_gemma3, "paligemma": build_paligemma}
# Image tokens of the red 8x8 and the blue 16x8 (width x height) image. LLaVA-NeXT: 16 base features plus
# the anyres tiles' features, unpadded, with one image_newline per row: 8x8 fits the 8x16 grid, unpadded to
# 4x4 -> 4 rows of 4 + 1 = 20, 36 in all; 16x8 fills it exactly -> 4 rows of 8 + 1 = 36, 52 in all.
# Gemma 3 and PaliGemma resize every image to 8x8: 4 tokens (4x4 patches pooled 2x2), 16 tokens.
IMAGE_TOKENS = {
    "llava_next": {"red": 36, "blue": 52},
    "gemma3": {"red": 4, "blue": 4},
    "paligemma": {"red": 16, "blue": 16},
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, BUILDERS[name](tmp_path_factory.mktemp(name))


def write_two_size_pairs(folder: Path, n: int) -> Path:
    """`write_colour_pairs`'s rows with the blue image 16 px wide and 8 high (red and green stay 8x8)."""
    from PIL import Image

    data = write_colour_pairs(folder, n=n)
    Image.new("RGB", (16, 8), (0, 0, 255)).save(folder / "img" / "blue.png")
    return data


def model_token_types(name: str, batch: dict, tokenizer) -> torch.Tensor:
    """The token_type_ids each model was trained with, written from its own convention: Gemma 3 marks its
    image tokens 1 (they attend to each other both ways); PaliGemma marks the suffix 1 (what its processor's
    `suffix=` gives: the prefix, images and prompt, attends both ways, the suffix causally), here the
    completion tokens."""
    if name == "gemma3":
        return (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<image_soft_token>")).long()
    return batch["completion_mask"].long()


def test_boundary_and_image_token_counts_with_two_image_sizes(family, tmp_path):
    """A batch with an 8x8 and a 16x8 image: each prompt holds the model's count of image tokens (LLaVA-NeXT
    36 and 52, Gemma 3 4 and 4, PaliGemma 16 and 16) and equals the processor's own ids; in both layouts the completion mask
    covers exactly the response tokens and EOS; `image_sizes` (LLaVA-NeXT) and `token_type_ids` as the
    model takes them (`model_token_types`) reach the batch. A prompt too long for
    max_prompt_length is an error that counts its image tokens."""
    from alignkit.data.readers import DataError
    from alignkit.data.vision_rows import (
        collate_vision_pairs,
        collate_vision_shared_prompt,
        image_token_count,
        load_processor,
        load_vision_rows,
        read_image,
        tokenize_vision_rows,
    )

    name, model = family
    processor = load_processor(str(model))
    rows = load_vision_rows(str(write_two_size_pairs(tmp_path, n=2)), None, processor).rows
    examples, _ = tokenize_vision_rows(rows, processor, max_length=128, max_prompt_length=96)
    n_red = IMAGE_TOKENS[name]["red"]
    with pytest.raises(DataError, match=f"pairs.jsonl:1-2: field 'prompt': .*, {n_red} of them image tokens"):
        tokenize_vision_rows(rows, processor, max_length=128, max_prompt_length=n_red)
    tok = processor.tokenizer
    colours = [Path(row.images[0]).stem for row in rows]
    assert colours == ["red", "blue"]
    for row, e, colour in zip(rows, examples, colours):
        assert image_token_count(processor, e["prompt_ids"]) == IMAGE_TOKENS[name][colour]
        expected = processor(text=[row.prompt], images=[read_image(r) for r in row.images])["input_ids"][0]
        assert e["prompt_ids"] == list(expected)
        assert e["chosen_ids"] == tok(row.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(e["chosen_ids"]).split()[:3] == ["it", "is", colour]
    pad = tok.pad_token_id
    two_rows = collate_vision_pairs(examples, pad, processor=processor)
    for r in range(4):
        e = examples[r % 2]
        P, C = len(e["prompt_ids"]), len(e["chosen_ids"] if r < 2 else e["rejected_ids"])
        assert two_rows["completion_mask"][r].nonzero().flatten().tolist() == list(range(P, P + C))
    one_row = collate_vision_shared_prompt(examples, pad, processor=processor)
    for key, response in (("chosen_mask", "chosen_ids"), ("rejected_mask", "rejected_ids")):
        counts = one_row[key].sum(1).tolist()
        assert sorted(counts) == sorted(len(e[response]) for e in examples)
        scored = one_row["input_ids"][one_row[key].bool()].tolist()
        assert sorted(scored) == sorted(t for e in examples for t in e[response])
    if name == "llava_next":  # (height, width), in the order of the pairs' images
        assert two_rows["image_sizes"].tolist() == [[8, 8], [8, 16]]
        assert "token_type_ids" not in two_rows
    else:
        assert torch.equal(two_rows["token_type_ids"], model_token_types(name, two_rows, tok))


def test_log_probs_equal_a_plain_forward(family, tmp_path):
    """The log-probs of the run's batch layout (vision.vision_setup picks it: share_prompt's one row for
    LLaVA-NeXT, two rows for Gemma 3 and PaliGemma, which build their masks from token_type_ids) equal the
    per-token log-softmax of the model's own forward on each sequence (pixel_values and image_sizes as the
    processor gives them, token_type_ids as `model_token_types`), gathered by hand on the completion
    tokens. Without the suffix type PaliGemma's completion tokens would see the tokens after them."""
    from alignkit.algorithms.dpo import pair_logps
    from alignkit.data.vision_rows import collate_vision_pairs, load_processor, prepare_vision_data
    from alignkit.models.load import load_causal_lm
    from alignkit.models.vision import vision_setup

    name, model_dir = family
    data = write_two_size_pairs(tmp_path / "data", n=3)
    cfg = vlm_config(model_dir, data, tmp_path / "out")
    run = vision_setup(cfg, log=lambda *a: None)
    processor = load_processor(str(model_dir))
    examples, _ = prepare_vision_data(cfg, processor, log=lambda *a: None)
    pad = processor.tokenizer.pad_token_id
    batch = run.layout(examples, pad)
    assert ("allowed" in batch) == (name == "llava_next")  # one row per pair, or two rows
    plain_batch = collate_vision_pairs(examples, pad, processor=processor)
    model = load_causal_lm(str(model_dir)).eval()
    inputs = {k: plain_batch[k] for k in ("input_ids", "attention_mask")}
    if name != "llava_next":
        inputs["token_type_ids"] = model_token_types(name, plain_batch, processor.tokenizer)
    inputs["pixel_values"] = plain_batch["pixel_values"].repeat(
        2, *[1] * (plain_batch["pixel_values"].dim() - 1)
    )
    if "image_sizes" in plain_batch:
        inputs["image_sizes"] = plain_batch["image_sizes"].repeat(2, 1)
    with torch.no_grad():
        ours = pair_logps(model, batch)
        logits = model(**inputs).logits.float().log_softmax(-1)
    ids, mask = plain_batch["input_ids"], plain_batch["completion_mask"]
    token_logps = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    torch.testing.assert_close(ours["chosen"], token_logps.sum(1)[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["rejected"], token_logps.sum(1)[3:], rtol=0, atol=1e-5)
    assert ours["n_chosen"].tolist() == [len(e["chosen_ids"]) for e in examples]


def test_dpo_lowers_the_loss_on_the_colour_task(family, tmp_path):
    """tests/test_vlm_dpo.py's colour task, the blue image 16x8: 20 steps take the loss from ln 2 to under
    0.45 (mean of the last 5), with the vision tower and projector frozen."""
    name, model = family
    cfg = vlm_config(model, write_two_size_pairs(tmp_path / "data", n=24), tmp_path / "out")
    metrics = train_losses(cfg)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    last = metrics[-5:]
    assert sum(m["loss"] for m in last) / 5 < 0.45
    assert sum(m["rewards/accuracies"] for m in last) / 5 > 0.75


@pytest.mark.parametrize("mdpo", [False, True])
def test_precomputed_reference_equals_on_the_fly(family, mdpo, tmp_path):
    """reference.mode=precomputed and copy give the same losses and rewards, step by step; with mDPO (two
    rows per pair plus the masked-image rows) the corrupted-image rewards too."""
    name, model = family
    data = write_two_size_pairs(tmp_path / "data", n=12)
    runs = {}
    for mode in ("precomputed", "copy"):
        extra = {"mdpo": True, "mdpo_corruption": "mask"} if mdpo else {}
        cfg = vlm_config(model, data, tmp_path / mode, max_steps=3, **extra)
        cfg.reference.mode = mode
        runs[mode] = train_losses(cfg)
    keys = ("loss", "rewards/chosen", "rewards/rejected") + (("rewards/corrupt_chosen",) if mdpo else ())
    for a, b in zip(runs["precomputed"], runs["copy"]):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert runs["copy"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the policy moved
