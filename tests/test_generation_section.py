"""The `generation:` section every sampling command has (alignkit.config.generation): each command's own
defaults, the flat keys it replaced refused with their new names wherever config arrives, the ranges that
differ by command, generation.backend resolved at run start and saved with the run, and --help."""

from __future__ import annotations

import importlib.util

import pytest

import alignkit
from alignkit.cli import main
from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError, build_config, from_mapping, load_config
from alignkit.config.online import GRPOConfig, OnlineDPOConfig, PPOConfig, RLOOConfig
from alignkit.config.preference import IterativeDPOConfig
from alignkit.config.supervised import DistillConfig
from alignkit.config.tools import EvalConfig, GenerateConfig
from alignkit.generation.resolve import resolve_backend
from alignkit.training.rundir import check_resumed_backend
from tests.conftest import write_prompts

SECTION = "(a `generation:` section in YAML)"


def test_every_sampling_command_keeps_its_own_sampling_defaults():
    """(max_new_tokens, temperature, top_k, top_p, batch_size, backend) as each command had them as flat
    keys: eval and generate write 48 tokens, eval samples 32 at once; top_k 0 and top_p 1 are off."""
    online = (64, 1.0, 0, 1.0, 64, "auto")
    expected = {
        GRPOConfig: online,
        RLOOConfig: online,
        PPOConfig: online,
        OnlineDPOConfig: online,
        IterativeDPOConfig: online,
        DistillConfig: (48, 1.0, 0, 1.0, 64, "auto"),
        EvalConfig: (48, 1.0, 0, 1.0, 32, "auto"),
        GenerateConfig: (48, 1.0, 0, 1.0, 64, "auto"),
    }
    for cls, values in expected.items():
        g = cls().generation
        assert (g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.batch_size, g.backend) == values, cls
    assert EvalConfig().scoring_batch_size == 32  # eval's log-likelihood batches, as its batch_size was


def test_moved_keys_are_refused_with_their_new_name_wherever_config_arrives(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ngeneration:\n  top_k: 4\ntemperature: 0.5\n")
    with pytest.raises(ConfigError) as e:  # a YAML file: its file and line
        load_config(GRPOConfig, str(path))
    assert str(e.value) == f"{path}:4: 'temperature' moved: write generation.temperature {SECTION}"
    with pytest.raises(ConfigError, match=r"^'generation_batch_size' moved: write generation.batch_size \("):
        load_config(PPOConfig, None, ["generation_batch_size=8"])  # key=value
    with pytest.raises(ConfigError, match="^'top_p' moved: write generation.top_p"):
        load_config(RLOOConfig, None, ["train.top_p=0.9"])  # through the `train:` grouping
    with pytest.raises(ConfigError, match="^'max_new_tokens' moved: write generation.max_new_tokens"):
        build_config(OnlineDPOConfig, {"max_new_tokens": 8})  # a dict
    with pytest.raises(ConfigError, match="^'top_k' moved: write generation.top_k"):
        build_config(DistillConfig, None, {"top_k": 5})  # keyword overrides
    with pytest.raises(ConfigError, match="^'temperature' moved: write generation.temperature"):
        from_mapping(IterativeDPOConfig, {"temperature": 0.7})
    with pytest.raises(ConfigError, match="^'temperature' moved: write generation.temperature"):
        alignkit.train("grpo", {"model": "m"}, temperature=0.5)  # the Python API, before anything loads
    with pytest.raises(ConfigError) as e:  # eval's batch_size bounded sampling and scoring both
        load_config(EvalConfig, None, ["batch_size=8"])
    assert str(e.value) == (
        f"'batch_size' moved: write generation.batch_size {SECTION}; the log-likelihood batches are "
        "scoring_batch_size"
    )
    with pytest.raises(ConfigError, match="^'batch_size' moved: write generation.batch_size"):
        load_config(GenerateConfig, None, ["batch_size=8"])
    # The new keys, nested or dotted, from each path.
    path.write_text("model: m\ngeneration:\n  temperature: 0.5\n  batch_size: 8\n")
    cfg = load_config(GRPOConfig, str(path), ["generation.top_k=4"])
    assert (cfg.generation.temperature, cfg.generation.batch_size, cfg.generation.top_k) == (0.5, 8, 4)
    cfg = from_mapping(IterativeDPOConfig, {"generation.max_new_tokens": 9, "generation": {"top_k": 2}})
    assert (cfg.generation.max_new_tokens, cfg.generation.top_k, cfg.generation.batch_size) == (9, 2, 64)
    cfg = build_config(EvalConfig, {"generation": {"max_new_tokens": 9}}, {"generation.top_p": 0.9})
    assert (cfg.generation.max_new_tokens, cfg.generation.top_p, cfg.generation.batch_size) == (9, 0.9, 32)
    for given in ({"generation": {"max_new_tokens": 9}}, {"generation.max_new_tokens": 9}):  # a sweep's eval:
        cfg = from_mapping(EvalConfig, given, "eval")
        assert (cfg.generation.max_new_tokens, cfg.generation.batch_size) == (9, 32)  # eval's own defaults
    with pytest.raises(ConfigError, match="^'eval.max_new_tokens' moved: write generation.max_new_tokens"):
        from_mapping(EvalConfig, {"max_new_tokens": 9}, "eval")


def test_the_sampling_ranges_of_each_command_name_the_section_key():
    """Online training, iterative-dpo and distill need a temperature above 0; eval and generate take 0
    (greedy). Eval samples through generate only; distill cannot use vLLM. "Off" is 0 / 1 everywhere: an
    explicit null is not a value of top_k / top_p."""
    for cls in (GRPOConfig, PPOConfig, OnlineDPOConfig, IterativeDPOConfig, DistillConfig):
        with pytest.raises(ConfigError, match=r"'generation.temperature' must be > 0 \(.*\), got 0.0"):
            load_config(cls, None, ["generation.temperature=0"])
    for cls in (EvalConfig, GenerateConfig):
        assert load_config(cls, None, ["generation.temperature=0"]).generation.temperature == 0
        with pytest.raises(ConfigError, match="'generation.top_k': expected an integer, got None"):
            load_config(cls, None, ["generation.top_k=null"])
    with pytest.raises(ConfigError, match="generation.backend=loop is not available here: eval samples"):
        load_config(EvalConfig, None, ["generation.backend=loop"])
    with pytest.raises(
        ConfigError, match="generation.backend=vllm is not available here: distill .* two engines"
    ):
        load_config(DistillConfig, None, ["generation.backend=vllm"])
    with pytest.raises(ConfigError, match="'generation.backend' must be one of auto, loop, hf, vllm"):
        load_config(GRPOConfig, None, ["generation.backend=generate"])
    with pytest.raises(ConfigError, match=r"'generation.top_p' must be in \(0, 1\]"):
        load_config(GenerateConfig, None, ["generation.top_p=0"])


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
    from transformers import AutoConfig

    llama, t5, vlm = str(tiny_model_dir), str(tiny_t5_dir), tiny_llava_config_dir(tmp_path / "llava")
    assert resolve_backend("auto", [llama]) == "loop"
    assert resolve_backend("auto", [t5]) == "hf"
    assert resolve_backend("auto", [vlm]) == "hf"
    assert resolve_backend("auto", [llama, t5]) == "hf"  # (distill: the teacher and the student)
    assert resolve_backend("hf", [llama]) == "hf" and resolve_backend("loop", [llama]) == "loop"
    if importlib.util.find_spec("vllm") is None:  # the main environment: how to install it, before any load
        with pytest.raises(ImportError, match=r"pip install 'alignkit\[vllm\]'"):
            resolve_backend("vllm", [llama], on_cpu=False)
    else:
        assert resolve_backend("vllm", [llama], on_cpu=False) == "vllm"
        with pytest.raises(ConfigError, match="vLLM's CPU attention computes head sizes"):
            resolve_backend("vllm", [llama], on_cpu=True)  # head size 8
    with pytest.raises(ConfigError, match=f"generation.backend=loop cannot drive {t5} is an encoder-decoder"):
        resolve_backend("loop", [llama, t5])
    with pytest.raises(
        ConfigError, match=f"generation.backend=loop cannot drive {vlm} \\(LlavaForConditional"
    ):
        resolve_backend("loop", [vlm])
    with pytest.raises(ConfigError, match=f"generation.backend=vllm: {t5}: t5 is an encoder-decoder"):
        resolve_backend("vllm", [t5])
    with pytest.raises(
        ConfigError, match=f"generation.backend=vllm: {vlm}: llava is a vision-language model"
    ):
        resolve_backend("vllm", [vlm])
    scorer = tmp_path / "reward-model"
    AutoConfig.from_pretrained(llama).save_pretrained(scorer)
    (scorer / "config.json").write_text(
        (scorer / "config.json").read_text().replace("LlamaForCausalLM", "LlamaForSequenceClassification")
    )
    with pytest.raises(ConfigError, match="LlamaForSequenceClassification is a reward or value model"):
        resolve_backend("vllm", [str(scorer)])


def test_the_resolved_backend_is_saved_and_a_resume_that_changes_it_is_refused(tmp_path, tiny_model_dir):
    """A grpo run with backend auto saves `backend: loop` (what sampled) in config.yaml and its checkpoint;
    resuming it with generation.backend=hf is refused naming both, resuming with auto goes on."""
    import yaml

    from alignkit.algorithms import grpo

    cfg = GRPOConfig(
        model=str(tiny_model_dir),
        data=write_prompts(tmp_path / "prompts.jsonl"),
        output_dir=str(tmp_path / "out"),
        rewards=[{"type": "length"}],
        batch_size=2,
        num_generations=2,
        generation=GenerationSettings(max_new_tokens=4),
        beta=0.0,
        max_steps=2,
        save_steps=1,  # (a checkpoint at step 1; the last step's is the final model)
        progress=False,
        report=False,
    )
    grpo.train(cfg)
    assert cfg.generation.backend == "auto"  # the caller's config is left as it was
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["generation"]["backend"] == "loop"
    again = build_config(GRPOConfig, cfg, {"resume": True, "generation.backend": "hf"})
    with pytest.raises(ValueError, match=r'generation.backend \(checkpoint: "loop", now: "hf"\)'):
        grpo.train(again)
    grpo.train(build_config(GRPOConfig, cfg, {"resume": True, "overwrite": False}))


def test_a_run_in_rounds_refuses_a_resume_under_another_backend(tmp_path):
    """iterative-dpo's checkpoints are its rounds' DPO runs, which hold no sampling settings: its resume
    compares the backend it resolves with the one its config.yaml saved."""
    (tmp_path / "config.yaml").write_text("model: m\ngeneration:\n  backend: loop\n  top_k: 0\n")
    check_resumed_backend(tmp_path, "loop")
    with pytest.raises(ConfigError, match="sampled with generation.backend=loop; this run resolves it to hf"):
        check_resumed_backend(tmp_path, "hf")
    check_resumed_backend(tmp_path / "new", "hf")  # nothing saved: nothing to compare


def test_help_shows_the_generation_section_at_each_commands_defaults(capsys):
    assert main(["grpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "  generation.*\n      How rollouts are sampled." in text
    for line in ("generation.backend = \"auto\"", "generation.temperature = 1.0", "generation.batch_size = 64",
                 "generation.vllm.mode = \"colocate\""):  # fmt: skip
        assert f"  {line}\n" in text
    assert "  temperature = " not in text and "generation_batch_size" not in text
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    for line in ("generation.max_new_tokens = 48", "generation.batch_size = 32", "scoring_batch_size = 32"):
        assert f"  {line}\n" in text
    assert "  batch_size = " not in text
