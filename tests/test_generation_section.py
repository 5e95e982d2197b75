"""The `generation:` section every sampling command has (alignkit.config.generation): each command's own
defaults, the flat keys it replaced refused with their new names wherever config arrives, the ranges that
differ by command, generation.backend resolved at run start and saved with the run, and --help."""

from __future__ import annotations

import pytest

from alignkit.config.load import ConfigError
from alignkit.generation.resolve import resolve_backend
from alignkit.training.rundir import check_resumed_backend


def tiny_llava_config_dir(path):
    """A folder holding only the config.json of a tiny LLaVA (a vision-language model): all the backend
    resolution reads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=8, patch_size=4)  # fmt: skip
    LlavaConfig(vision_config=vision, text_config=text, image_token_index=63).save_pretrained(path)
    return str(path)


def test_auto_resolves_from_the_model_class_and_a_backend_a_model_cannot_use_is_refused(
    tiny_model_dir, tiny_t5_dir, tmp_path
):
    """auto: the lean loop for a decoder it drives, hf for an encoder-decoder or a VLM (whose class
    prepares its own generation inputs), hf when any sampled model needs it; loop and vllm, asked for, are
    refused with the reason for the models they cannot drive."""
    llama, t5, vlm = str(tiny_model_dir), str(tiny_t5_dir), tiny_llava_config_dir(tmp_path / "llava")
    assert resolve_backend("auto", [llama]) == "loop"
    assert resolve_backend("auto", [t5]) == "hf"
    assert resolve_backend("auto", [vlm]) == "hf"
    assert resolve_backend("auto", [llama, t5]) == "hf"  # (distill: the teacher and the student)
    assert resolve_backend("hf", [llama]) == "hf" and resolve_backend("loop", [llama]) == "loop"
    assert resolve_backend("vllm", [llama]) == "vllm"
    with pytest.raises(ConfigError, match=f"generation.backend=loop cannot drive {t5} is an encoder-decoder"):
        resolve_backend("loop", [llama, t5])
    with pytest.raises(
        ConfigError, match=f"generation.backend=loop cannot drive {vlm} \\(LlavaForConditional"
    ):
        resolve_backend("loop", [vlm])
    with pytest.raises(ConfigError, match=f"generation.backend=vllm: {t5} is an encoder-decoder"):
        resolve_backend("vllm", [t5])
    with pytest.raises(ConfigError, match=f"generation.backend=vllm: {vlm} is a vision-language model"):
        resolve_backend("vllm", [vlm])


def test_a_run_in_rounds_refuses_a_resume_under_another_backend(tmp_path):
    """iterative-dpo's checkpoints are its rounds' DPO runs, which hold no sampling settings: its resume
    compares the backend it resolves with the one its config.yaml saved."""
    (tmp_path / "config.yaml").write_text("model: m\ngeneration:\n  backend: loop\n  top_k: 0\n")
    check_resumed_backend(tmp_path, "loop")
    with pytest.raises(ConfigError, match="sampled with generation.backend=loop; this run resolves it to hf"):
        check_resumed_backend(tmp_path, "hf")
    check_resumed_backend(tmp_path / "new", "hf")  # nothing saved: nothing to compare
