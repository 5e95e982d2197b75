"""Shared fixtures: tiny models built locally (no hub access), real data shipped with the repo."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from alignkit.training.loop import RunInterrupted

# Tests compare numbers computed in float32 (hand-derived losses, 1- vs 2-process updates, micro-batch
# splits). mixed_precision=auto picks bf16 autocast on CPUs that compute it natively (AVX512-BF16, AMX),
# which would make those comparisons depend on the machine; the launcher variable that `auto` honours
# (training.setup.resolve_mixed_precision) pins fp32 here and in every process a test starts. Tests of the auto
# choice itself unset it, and tests/test_ppo.py runs bf16 autocast where the CPU has it.
os.environ["ACCELERATE_MIXED_PRECISION"] = "no"

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO / "alignkit" / "assets" / "tinystories-656k"
HH_SAMPLE = REPO / "examples" / "data" / "hh-harmless-1600.jsonl"  # shipped, see examples/data/README.md
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


def build_tiny_t5(path: Path, seed: int = 0, d_model: int = 32, tie: bool = False) -> Path:
    """A randomly initialised tiny T5 (encoder-decoder) with the TinyStories tokenizer, saved like a hub
    checkpoint. tie=False is FLAN-T5's layout (separate output head, unscaled decoder output)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=2048,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        tie_word_embeddings=tie,
        feed_forward_proj="gated-gelu",
    )
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TINYSTORIES / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """Path of a tiny random T5 (d_model 32, 2+2 layers, vocab 2048) with a real tokenizer."""
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def build_tiny_classifier(path: Path, labels: list[str], words: list[str], seed: int = 0) -> Path:
    """A tiny random BERT sequence classifier with the given labels (id2label in order) and a word-level
    tokenizer over `words` (anything else is [UNK]), saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    return path


def write_prompts(path: Path, n: int = 16) -> str:
    """A prompt file of n short story openings (the online-RL tests' data)."""
    import json

    path.write_text("".join(json.dumps({"prompt": f"Tom went out {i}. It was"}) + "\n" for i in range(n)))
    return str(path)


def train_metrics(cfg) -> list[dict]:
    """The train lines of a run's metrics.jsonl."""
    import json

    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    return [m for m in lines if m["split"] == "train"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a tiny random Llama (hidden 32, 2 layers, vocab 2048) with a real tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    """The real TinyStories tokenizer (a hard prompt/completion boundary case)."""
    from alignkit.models.load import load_tokenizer

    return load_tokenizer(str(TINYSTORIES))


@pytest.fixture(scope="session")
def hh_sample() -> Path:
    """The 1,600-row Anthropic HH sample shipped in examples/data (part of the repository: never skipped)."""
    if not HH_SAMPLE.is_file():
        pytest.fail(f"{HH_SAMPLE} is missing: it is part of the repository (examples/data/README.md)")
    return HH_SAMPLE


# --------------------------------------------------------------------------------------------
# CI: a test skipped because a file is missing is a failure, not a pass. Locally such a skip stays a
# skip; with CI=true (CI sets it, and .ci/run exports it) it is reported as failed, so a green run
# means every test ran against the data and assets it needs.

MISSING_FILE_SKIP = re.compile(r"not present|not found|missing|no such file|does not exist", re.IGNORECASE)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_missing_file_skip(report) -> None:
    if not (report.skipped and _in_ci()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if MISSING_FILE_SKIP.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped for a missing file, which CI (CI=true) counts as a failure: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_missing_file_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_missing_file_skip(report)  # a module-level pytest.skip(...) / skipif at collection time
    return report


def ctrl_c() -> None:
    """Press Ctrl-C: a real SIGINT to this process (the training loops finish the step, save it and raise
    RunInterrupted, a KeyboardInterrupt; a raised KeyboardInterrupt is a second Ctrl-C, which drops the step)."""
    import signal

    os.kill(os.getpid(), signal.SIGINT)


def ctrl_c_at(monkeypatch, module, name: str, call: int):
    """Patch `module.name` to press Ctrl-C at its `call`-th call (then run as usual); returns the original."""
    real, calls = getattr(module, name), {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            ctrl_c()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)
    return real


def interrupt_then_resume(train, cfg, monkeypatch, module, name: str, call: int) -> list[dict]:
    """Run `train(cfg)` with Ctrl-C pressed at the `call`-th call of `module.name` (the loop finishes that
    step, checkpoints it and raises RunInterrupted), then again with resume=true; returns the resumed run's train
    metrics lines."""
    real = ctrl_c_at(monkeypatch, module, name, call)
    with pytest.raises(RunInterrupted) as stopped:
        train(cfg)
    assert not stopped.value.dropped and stopped.value.checkpoint is not None
    monkeypatch.setattr(module, name, real)
    cfg.resume = True
    train(cfg)
    return train_metrics(cfg)
