"""What the VLM DPO layouts cost, forward + backward of `dpo.pair_logps` with the vision tower frozen
(freeze_vision's default): share_prompt's one [prompt | chosen | rejected] row per pair (images encoded
once, image and prompt tokens through the language model once), two rows per pair with the images encoded
once (what mDPO and multimodal-RoPE models use), and two rows with every row's image encoded (2B images).

    OMP_NUM_THREADS=1 python benchmarks/vlm_image_encoding.py [--device cuda] [--repeats 5]

A random LLaVA-shaped model: CLIP tower (hidden 256, 4 layers, 112-px images, patch 14 -> 64 image tokens)
and a Llama text model (hidden 256, 2 layers); 4 pairs per batch. Not part of the test run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from PIL import Image
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from alignkit.algorithms.dpo import pair_logps
    from alignkit.data.vision import collate_vision_pairs, collate_vision_shared_prompt, expand_prompt
    from alignkit.logprobs import completion_logps
    from alignkit.vision import freeze_vision
    from tests.test_vlm_dpo import LLAVA_TEMPLATE, WORDS, word_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tok = word_tokenizer(["<image>"], [*WORDS, "USER:", "ASSISTANT:"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}
        ),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=112,
        patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>")
    )
    model = LlavaForConditionalGeneration(config).to(args.device)
    freeze_vision(model)
    with tempfile.TemporaryDirectory() as folder:
        examples = []
        for i, colour in enumerate(["red", "blue", "green", "red"]):
            path = Path(folder) / f"{i}.png"
            Image.new(
                "RGB", (112, 112), {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}[colour]
            ).save(path)
            prompt = "USER: <image> what colour is this ASSISTANT:"
            ids, _ = expand_prompt(processor, prompt, [Image.open(path)], tok(prompt)["input_ids"])
            completion = tok(f" it is {colour} .")["input_ids"] + [tok.eos_token_id]
            examples.append(
                {
                    "prompt_ids": ids,
                    "chosen_ids": completion,
                    "rejected_ids": completion[::-1],
                    "images": [str(path)],
                    "preference": 1.0,
                    "line": i,
                }
            )
        batch = collate_vision_pairs(examples, tok.pad_token_id, processor=processor)
        shared = collate_vision_shared_prompt(examples, tok.pad_token_id, processor=processor)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    shared = {k: v.to(args.device) for k, v in shared.items()}

    def one_row():
        return pair_logps(model, shared)["chosen"].sum()

    def once():
        return pair_logps(model, batch)["chosen"].sum()

    def every_row():
        pixels = batch["pixel_values"].repeat(2, 1, 1, 1)
        out = completion_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            model_inputs=lambda backbone: {"pixel_values": pixels},
        )
        return out.sum[:4].sum()

    variants = (
        ("share_prompt: one row per pair", one_row),
        ("two rows, images encoded once", once),
        ("two rows, every row's image encoded", every_row),
    )
    for name, fn in variants:
        times = []
        for _ in range(args.repeats + 1):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().backward()
            model.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = sorted(times[1:])[len(times[1:]) // 2]
        print(
            f"{name:<36} median {best * 1000:8.1f} ms per batch (forward + backward, {args.repeats} repeats)"
        )


if __name__ == "__main__":
    main()
