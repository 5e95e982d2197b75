"""Shared fixtures: tiny models built locally (no hub access), real data shipped with the repo."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO / "alignkit" / "assets" / "tinystories-656k"
HH_SAMPLE = REPO.parent / "shared" / "data" / "hh-harmless-1600.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tiny_llama(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised tiny Llama with the TinyStories tokenizer, saved like a hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TINYSTORIES / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a tiny random Llama (hidden 32, 2 layers, vocab 2048) with a real tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    """The real TinyStories tokenizer (a hard prompt/completion boundary case)."""
    from alignkit.models import load_tokenizer

    return load_tokenizer(str(TINYSTORIES))


@pytest.fixture(scope="session")
def hh_sample() -> Path:
    if not HH_SAMPLE.exists():
        pytest.skip(f"{HH_SAMPLE} not present")
    return HH_SAMPLE
