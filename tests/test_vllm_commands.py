"""`alignkit eval`, `alignkit generate` and the local LLM judge with vLLM drawing the samples (the
colocated engine, generation/vllm.py): greedy results equal the transformers backends' token for token on
the peaked tiny Llama of tests/test_vllm.py (top-2 margins asserted, so kernel rounding cannot flip an
argmax). They run where vLLM is installed, as tests/test_vllm.py's do (skipped elsewhere, saying why)."""

from __future__ import annotations

import json

import pytest
import test_vllm as colocated
from test_vllm import HAVE_VLLM, PROMPTS, perturbed, top2_margin

from alignkit.config.generation import GenerationSettings, VLLMSettings

pytestmark = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed in this environment; its tests run in their own one: "
    "`bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest -q tests/test_vllm_commands.py`",
)
peaked_llama_dir, policy, tok = colocated.peaked_llama_dir, colocated.policy, colocated.tok
ENGINE = VLLMSettings(cpu_kv_cache_gb=0.25)


def greedy_settings(backend: str, max_new_tokens: int = 12) -> GenerationSettings:
    return GenerationSettings(backend=backend, temperature=0.0, max_new_tokens=max_new_tokens, vllm=ENGINE)


@pytest.fixture(scope="module")
def aligned_dir(policy, tok, tmp_path_factory):
    """The peaked Llama with seeded noise on every weight (greedy output that differs), saved."""
    path = tmp_path_factory.mktemp("aligned")
    perturbed(policy).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def assert_clear_margins(model_dir, tok, max_new_tokens: int):
    """The greedy paths of every prompt have a top-2 logit gap no kernel rounding could flip."""
    from alignkit.data.prompts import encode_prompt
    from alignkit.generation.sampling import sample_ids
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(str(model_dir), pad_token_id=tok.pad_token_id)
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    greedy = sample_ids(model, tok, ids, max_new_tokens=max_new_tokens, temperature=0.0, backend="loop")
    assert top2_margin(model, ids, greedy) > 1e-3


def test_eval_with_vllm_reports_what_hf_reports_greedily(
    peaked_llama_dir, aligned_dir, prompts_file, tmp_path, tok
):
    """One engine samples both models (synced to each in turn): at temperature 0 the report's samples,
    rewards and KL are the hf backend's."""
    from alignkit.config.tools import EvalConfig
    from alignkit.evaluation.command import run

    for model_dir in (peaked_llama_dir, aligned_dir):
        assert_clear_margins(model_dir, tok, 12)
    reports = {}
    for backend in ("hf", "vllm"):
        cfg = EvalConfig(
            base_model=str(peaked_llama_dir),
            model=str(aligned_dir),
            prompts=str(prompts_file),
            rewards=[{"type": "length"}, {"type": "regex", "pattern": "e", "mode": "count"}],
            num_samples=1,
            generation=greedy_settings(backend),
            output_dir=str(tmp_path / backend),
        )
        reports[backend] = run(cfg)
    hf, vllm = reports["hf"], reports["vllm"]
    assert vllm["config"]["generation"]["backend"] == "vllm"
    assert vllm["examples"] == hf["examples"] and vllm["rewards"] == hf["rewards"]
    assert vllm["kl"] == pytest.approx(hf["kl"], abs=1e-6)
    assert any(e["base"] != e["aligned"] for e in hf["examples"])


def test_eval_with_vllm_refuses_models_of_other_shapes(peaked_llama_dir, prompts_file, tmp_path):
    from conftest import build_tiny_llama

    from alignkit.config.tools import EvalConfig
    from alignkit.evaluation.command import run

    other = build_tiny_llama(tmp_path / "other", hidden=256, layers=1)
    cfg = EvalConfig(
        base_model=str(peaked_llama_dir),
        model=str(other),
        prompts=str(prompts_file),
        rewards=[{"type": "length"}],
        generation=greedy_settings("vllm"),
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(ValueError, match="different weights' names or shapes: use generation.backend=hf"):
        run(cfg)


def test_generate_with_vllm_draws_the_loops_greedy_candidates(peaked_llama_dir, prompts_file, tmp_path, tok):
    from alignkit.config.tools import GenerateConfig
    from alignkit.inference.best_of_n import run

    assert_clear_margins(peaked_llama_dir, tok, 12)
    candidates = {}
    for backend in ("loop", "vllm"):
        cfg = GenerateConfig(
            model=str(peaked_llama_dir),
            prompts=str(prompts_file),
            rewards=[{"type": "length"}],
            n=1,
            generation=greedy_settings(backend),
            output_dir=str(tmp_path / backend),
            progress=False,
        )
        run(cfg)
        lines = (tmp_path / backend / "candidates.jsonl").read_text().splitlines()
        candidates[backend] = [json.loads(line)["candidates"] for line in lines]
    assert len(candidates["vllm"]) == len(PROMPTS)
    assert candidates["vllm"] == candidates["loop"]


def test_generate_with_vllm_samples_reproducibly(peaked_llama_dir, prompts_file, tmp_path):
    """Sampled (temperature 1, n 4): each prompt's candidates come from its own seeded request, so a second
    run gives the same candidates, and a prompt's n candidates are not all one."""
    from alignkit.config.tools import GenerateConfig
    from alignkit.inference.best_of_n import run

    runs = []
    for name in ("a", "b"):
        cfg = GenerateConfig(
            model=str(peaked_llama_dir),
            prompts=str(prompts_file),
            rewards=[{"type": "length"}],
            n=4,
            generation=GenerationSettings(backend="vllm", temperature=1.0, max_new_tokens=8, vllm=ENGINE),
            output_dir=str(tmp_path / name),
            progress=False,
        )
        run(cfg)
        runs.append((tmp_path / name / "candidates.jsonl").read_text())
    assert runs[0] == runs[1]
    first = json.loads(runs[0].splitlines()[0])["candidates"]
    assert len(first) == 4 and len({json.dumps(c) for c in first}) > 1


def test_a_local_judge_on_vllm_answers_as_on_transformers(peaked_llama_dir, tok):
    """engine=vllm: the judge's own engine, no transformers model loaded beside it, answers each
    conversation greedily with hf's words."""
    from alignkit.rewards.backends import LocalChatBackend

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    answers = {}
    for engine in ("hf", "vllm"):
        backend = LocalChatBackend(
            str(peaked_llama_dir), max_new_tokens=12, engine=engine, vllm_settings=ENGINE
        )
        assert (backend.model is None) == (engine == "vllm")
        answers[engine] = [a for _, a in backend.complete(conversations)]
    assert answers["vllm"] == answers["hf"] and all(answers["hf"])


def test_a_judge_spec_takes_the_engine_and_refuses_its_settings_elsewhere(peaked_llama_dir):
    from alignkit.config.load import ConfigError
    from alignkit.rewards.registry import build_reward

    spec = {"type": "judge", "backend": "local", "model": str(peaked_llama_dir), "max_tokens": 4}
    judge = build_reward({**spec, "engine": "vllm", "vllm": {"cpu_kv_cache_gb": 0.25}})
    assert judge.backend.engine is not None
    with pytest.raises(ConfigError, match="'vllm' settings have no effect with engine hf"):
        build_reward({**spec, "vllm": {"cpu_kv_cache_gb": 0.25}})
    with pytest.raises(ConfigError, match="unknown key.*server_url"):
        build_reward({**spec, "engine": "vllm", "vllm": {"server_url": "http://x"}})
    with pytest.raises(ConfigError, match="engine 'sglang' is not one of hf, vllm"):
        build_reward({**spec, "engine": "sglang"})
