"""Builds a randomly initialised student for the distillation worked example (docs/distillation.md): a
Llama half as wide as the shipped TinyStories-656K model (hidden 64 instead of 128, 2 layers, tied
embeddings), with the shipped model's tokenizer, so `alignkit distill` can compare their distributions
token by token.

    python scripts/build_small_student.py --output runs/small-student
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "alignkit" / "assets" / "tinystories-656k"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="the folder to write the student to")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    shipped = LlamaConfig.from_pretrained(SHIPPED)
    config = LlamaConfig(
        vocab_size=shipped.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=shipped.max_position_embeddings,
        bos_token_id=shipped.bos_token_id,
        eos_token_id=shipped.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    out = Path(args.output)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(SHIPPED / name, out / name)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters written to {out}")


if __name__ == "__main__":
    main()
