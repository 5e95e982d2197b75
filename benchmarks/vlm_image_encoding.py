"""What the VLM DPO layouts cost, forward + backward of `dpo.pair_logps` with the vision tower frozen
(freeze_vision's default): share_prompt's one [prompt | chosen | rejected] row per pair (images encoded
once, image and prompt tokens through the language model once), two rows per pair with the images encoded
once (what mDPO and share_prompt=false use), and two rows with every row's image encoded (2B images).

    OMP_NUM_THREADS=1 python benchmarks/vlm_image_encoding.py [--device cuda] [--repeats 5]

A random LLaVA-shaped model (tests/test_vlm_dpo.build_llava): CLIP tower hidden 256, 4 layers, 112-px
images, patch 14 -> 64 image tokens; Llama text model hidden 256, 2 layers (MLPs 2x hidden); 4 pairs of the tests' colour
rows per batch. Not part of the test run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_ms(fn, repeats: int, device: str) -> float:
    """Median wall time of `fn().backward()` over `repeats` runs after one warm-up, in ms."""
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times[1:])[repeats // 2]


def main() -> None:
    from alignkit.algorithms.dpo import pair_logps
    from alignkit.config.preference import DPOConfig
    from alignkit.data.vision_rows import (
        collate_vision_pairs,
        collate_vision_shared_prompt,
        load_processor,
        prepare_vision_data,
    )
    from alignkit.logprobs.completion import completion_logps
    from alignkit.models.load import load_causal_lm
    from alignkit.models.vision import freeze_vision
    from tests.test_vlm_dpo import build_llava, write_colour_pairs

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_llava(
            Path(folder) / "model", image_size=112, patch=14, hidden=256, vision_hidden=256, vision_layers=4
        )
        processor = load_processor(str(model_dir))
        data = write_colour_pairs(Path(folder) / "data", n=4)
        cfg = DPOConfig(model=str(model_dir), data=str(data), output_dir=str(Path(folder) / "out"))
        examples, _ = prepare_vision_data(cfg, processor, log=lambda *a: None)
        pad = processor.tokenizer.pad_token_id
        layouts = {
            "one": collate_vision_shared_prompt(examples, pad, processor=processor),
            "two": collate_vision_pairs(examples, pad, processor=processor),
        }
        model = load_causal_lm(str(model_dir)).to(args.device)
    freeze_vision(model)
    one, two = ({k: v.to(args.device) for k, v in b.items()} for b in layouts.values())

    def every_row():
        pixels = two["pixel_values"].repeat(2, 1, 1, 1)
        out = completion_logps(
            model,
            two["input_ids"],
            two["attention_mask"],
            two["completion_mask"],
            model_inputs=lambda backbone: {"pixel_values": pixels},
        )
        return out.sum[:4].sum()

    variants = (
        ("share_prompt: one row per pair", lambda: pair_logps(model, one)["chosen"].sum()),
        ("two rows, images encoded once", lambda: pair_logps(model, two)["chosen"].sum()),
        ("two rows, every row's image encoded", every_row),
    )
    for name, fn in variants:
        ms = median_ms(fn, args.repeats, args.device)
        model.zero_grad(set_to_none=True)
        print(f"{name:<36} median {ms:8.1f} ms per batch (forward + backward, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
