"""A tiny random Stable-Diffusion-layout pipeline and synthetic colour preferences, for an offline smoke run
of `alignkit diffusion-dpo` (and the tests in tests/test_diffusion_dpo.py, which build theirs with this file).

    python examples/diffusion_dpo/synthetic.py runs/diffusion-synthetic
    alignkit diffusion-dpo examples/diffusion_dpo/synthetic.yaml

writes runs/diffusion-synthetic/{pipeline/, images/, train.jsonl, eval.jsonl}: a pipeline with UNet block
channels (4, 8), a 2-layer CLIP text encoder, a 2-block VAE, a DDPM scheduler and a word-level tokenizer
(random weights: it draws noise, not pictures), and pairs of noisy 16-px squares where red is preferred to
blue. The pipeline loads exactly as a real one does (diffusers from_pretrained, subfolders), so the whole
command runs on a CPU in seconds; the model to align for real is in diffusion_dpo_sd15.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "red", "blue", "square"]


def build_tiny_pipeline(path: Path, seed: int = 0, sdxl: bool = False) -> Path:
    """A random tiny text-to-image pipeline saved in the SD 1.x folder layout, or with `sdxl` in SDXL's (a
    second, projecting text encoder and tokenizer; a UNet conditioned on both encoders, the pooled text
    embedding and the size/crop time ids). The VAE's scaling factor is 1 and the schedule 100 steps long, so
    that an image's latent is not drowned by the noise at most t (with SD's 0.18215 and 1000 steps a random
    VAE's latents carry almost no colour into x_t)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        PreTrainedTokenizerFast,
    )

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    special = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8, **special)
    for name in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        tokenizer.save_pretrained(path / name)
    torch.manual_seed(seed)
    text = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        projection_dim=8,
    )
    CLIPTextModel(text).save_pretrained(path / "text_encoder")
    blocks = {"block_out_channels": (4, 8), "layers_per_block": 1, "norm_num_groups": 2}
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
        scaling_factor=1.0,
        **blocks,
    )
    vae.save_pretrained(path / "vae")
    # SDXL: cross-attention over both encoders' states (8 + 8); the added embedding takes the pooled text
    # embedding (8) and the 6 time ids, each embedded in 4 dimensions.
    xl = {"addition_embed_type": "text_time", "addition_time_embed_dim": 4}
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16 if sdxl else 8,
        attention_head_dim=2,
        **(dict(xl, projection_class_embeddings_input_dim=8 + 6 * 4) if sdxl else {}),
        **blocks,
    )
    unet.save_pretrained(path / "unet")
    if sdxl:
        CLIPTextModelWithProjection(text).save_pretrained(path / "text_encoder_2")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(path / "scheduler")
    return path


def write_colour_pairs(folder: Path, n: int, seed: int = 0, size: int = 16) -> list[dict]:
    """n pairs of noisy 16-px squares, the red one preferred to the blue one (images/*.png)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        names = []
        for colour, channel in (("red", 0), ("blue", 2)):
            pixels = torch.randint(0, 20, (size, size, 3), generator=g)
            pixels[..., channel] += 180
            names.append(f"images/{i}-{colour}.png")
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / names[-1])
        rows.append({"prompt": "a photo of a square", "chosen_image": names[0], "rejected_image": names[1]})
    return rows


def main(out: str) -> None:
    """Write the pipeline and 64 colour pairs (32 train, 32 eval) under `out`."""
    root = Path(out)
    build_tiny_pipeline(root / "pipeline")
    rows = write_colour_pairs(root, 64)
    for name, part in (("train", rows[:32]), ("eval", rows[32:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(
        f"wrote {root}/pipeline, {root}/images, {root}/train.jsonl (32 pairs), {root}/eval.jsonl (32 pairs)"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/diffusion-synthetic")
