"""The training commands with generation.backend=vllm (the colocated engine, generation/vllm.py): a short GRPO
and a short PPO learn the letter-count reward of tests/test_grpo.py, the sampler's gap to the trainer is
logged and corrected, a resumed run is exact, and the engine follows the policy at every step.

They run where vLLM is installed, as tests/test_vllm.py's do (skipped elsewhere, saying why)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, train_metrics, write_prompts
from test_vllm import HAVE_VLLM

from alignkit.config.generation import GenerationSettings, VLLMSettings

pytestmark = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed in this environment; its tests run in their own one: "
    "`bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest -q tests/test_vllm_training.py`",
)


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    """A tiny random Llama whose head size (256 / 4 heads = 64) vLLM's CPU attention computes."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), seed=0, hidden=256, layers=2)


def vllm_generation(**overrides) -> GenerationSettings:
    settings = dict(max_new_tokens=8, backend="vllm", vllm=VLLMSettings(cpu_kv_cache_gb=0.25))
    return GenerationSettings(**{**settings, **overrides})


def grpo_config(tmp_path, model, data, **overrides):
    from tests.test_grpo import config

    return config(tmp_path, model, data, generation=vllm_generation(), **overrides)


def test_grpo_with_vllm_learns_the_letter_count(tmp_path, llama64_dir):
    from alignkit.algorithms import grpo

    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = grpo_config(tmp_path, llama64_dir, data, max_steps=30, lr=3e-3)
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    rewards = [m["reward"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.8, rewards
    # the engine drew the tokens, so the correction is on (auto: sequence_mask) and its figures are logged:
    # the gap between vLLM's fp32 CPU kernels and the trainer's is rounding, and every sequence kept
    for m in metrics:
        assert m["sampler/logp_diff/max"] < 1e-3, m
        assert m["sampler/frac_masked"] == 0, m


def test_ppo_with_vllm_learns_the_letter_count(tmp_path, llama64_dir):
    from alignkit.algorithms import ppo
    from tests.test_ppo import config

    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, llama64_dir, data, generation=vllm_generation(), max_steps=30)
    ppo.train(cfg)
    rewards = [m["reward"] for m in train_metrics(cfg)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.8, rewards


def test_a_resumed_vllm_run_equals_the_uninterrupted_one(tmp_path, llama64_dir, monkeypatch):
    """6 steps in one go, and the same run stopped by Ctrl-C during step 3 (finished and saved) then resumed
    (a new sampler, synced from the checkpoint's weights): the same records at every step and the same final
    weights, bit for bit."""
    from safetensors.torch import load_file

    import alignkit.training.loop as online_loop
    from alignkit.algorithms import grpo
    from tests.conftest import interrupt_then_resume

    data = write_prompts(tmp_path / "prompts.jsonl")
    whole = grpo_config(tmp_path / "whole", llama64_dir, data, max_steps=6)
    grpo.train(whole)
    cut = grpo_config(tmp_path / "cut", llama64_dir, data, max_steps=6)
    resumed = interrupt_then_resume(grpo.train, cut, monkeypatch, online_loop, "collect", 3)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(train_metrics(whole), resumed):
        same = {k: a[k] for k in a if not k.startswith(("time/", "tokens/s"))}
        assert same == {k: b[k] for k in same}, a["step"]
    a = load_file(tmp_path / "whole" / "out" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "out" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_engine_follows_the_policy_at_every_rollout(tmp_path, llama64_dir, monkeypatch):
    """Weights are synced into the engine once per step, before its rollout (the evaluation after a step and
    the next step's rollout share one sync), and the engine then samples the trainer's distribution: its
    log-probs of what it drew equal the trainer's at every step, updates at lr 3e-2 in between."""
    import alignkit.generation.vllm as vllm_module
    from alignkit.algorithms import grpo

    data = write_prompts(tmp_path / "prompts.jsonl")
    syncs = []
    real_sync = vllm_module.ColocatedVLLM.sync

    def sync(self, model, version):
        if version != self.version:
            syncs.append(version)
        real_sync(self, model, version)

    monkeypatch.setattr(vllm_module.ColocatedVLLM, "sync", sync)
    cfg = grpo_config(tmp_path, llama64_dir, data, max_steps=3, eval_steps=1, eval_fraction=0.25, lr=3e-2)
    grpo.train(cfg)
    assert syncs == [
        0,
        1,
        2,
        3,
    ]  # step 0's rollout; after steps 1-3, the evaluation (steps 1, 2: the rollout too)
    metrics = train_metrics(cfg)
    assert len(metrics) == 3 and all(m["sampler/logp_diff/max"] < 1e-3 for m in metrics), metrics


def test_online_dpo_with_vllm_logs_the_samplers_gap(tmp_path, llama64_dir):
    """Online DPO samples its pairs with the engine; no loss reads the sampler's log-probs, but their gap to
    the trainer's is logged (rounding here: fp32 on both sides)."""
    from alignkit.algorithms import online_dpo
    from tests.test_online_dpo import config

    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, llama64_dir, data, generation=vllm_generation(), max_steps=3)
    online_dpo.train(cfg)
    metrics = train_metrics(cfg)
    assert len(metrics) == 3 and all(m["sampler/logp_diff/max"] < 1e-3 for m in metrics), metrics


def test_iterative_dpo_samples_each_round_from_the_last_rounds_policy(tmp_path, llama64_dir, monkeypatch):
    """One engine for the run, synced to each round's starting policy (the model, then round 1's result):
    round 2's samples are the round-1 model's, as the loop backend's would be."""
    import alignkit.generation.vllm as vllm_module
    from alignkit.algorithms import iterative
    from tests.test_iterative import config

    synced = []
    real_sync = vllm_module.ColocatedVLLM.sync

    def sync(self, model, version):
        if version != self.version:
            synced.append((version, next(model.parameters()).detach().clone()))
        real_sync(self, model, version)

    monkeypatch.setattr(vllm_module.ColocatedVLLM, "sync", sync)
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, llama64_dir, data, generation=vllm_generation())
    iterative.train(cfg)
    assert [v for v, _ in synced] == [0, 1]
    assert not torch.equal(synced[0][1], synced[1][1])  # round 2 sampled from round 1's weights
    for k in (1, 2):
        assert (tmp_path / "out" / f"round-{k}" / "samples.jsonl").is_file()


def test_under_bf16_mixed_precision_the_engine_samples_in_bf16(tmp_path, llama64_dir, monkeypatch):
    """mixed_precision=bf16 trains fp32 master weights under bf16 autocast: the colocated engine computes in
    bf16 too (not the fp32 of the weights, twice the memory and time on a GPU), the synced fp32 weights
    cast in. The sampler's gap to the trainer is then bf16 rounding, far below what unsynced weights give."""
    import alignkit.generation.vllm as vllm_module
    from alignkit.algorithms import grpo

    built = []
    real_start = vllm_module.ColocatedVLLM._start

    def start(self, *args, **kwargs):
        built.append(kwargs["dtype"])
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(vllm_module.ColocatedVLLM, "_start", start)
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = grpo_config(tmp_path, llama64_dir, data, max_steps=3, lr=3e-2, mixed_precision="bf16")
    grpo.train(cfg)
    assert built == ["bfloat16"]
    metrics = train_metrics(cfg)
    assert all(m["sampler/logp_diff/mean"] < 0.05 for m in metrics), metrics


def test_two_processes_each_sample_with_their_own_engine(tmp_path, llama64_dir):
    """Under torchrun (DDP on CPUs, gloo) every process holds its own colocated engine, synced from the
    same weights, and samples its own prompts: the run trains, each step's gap to the trainer is rounding
    over both processes' tokens, and it exits cleanly (vLLM's shutdown leaves the process group)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    data = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "alignkit.cli", "grpo", f"model={llama64_dir}", f"data={data}", f"output_dir={out}"]
    command += ["rewards=[{type: regex, pattern: e, mode: count}]", "max_steps=2", "batch_size=4"]
    command += ["num_generations=4", "generation.max_new_tokens=8", "generation.backend=vllm"]
    command += ["generation.vllm.cpu_kv_cache_gb=0.25", "mixed_precision=no", "progress=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["sampler/logp_diff/max"] < 1e-3 for r in train), train


def test_guide_traces_beside_a_vllm_policy_sampler(tmp_path, llama64_dir):
    """guide.mode=traces with the colocated engine drawing the policy's completions and the guide's traces
    from the lean loop: each group holds the engine's G − k samples and the guide's k, only the engine's rows
    are importance-corrected (their gap to the trainer is rounding; the guide's own log-probs, nats away from
    the policy's, never enter it), and the guide figures are logged."""
    from alignkit.algorithms import grpo
    from alignkit.config.guide import GuideSettings
    from tests.test_guide_traces import e_count_guide

    guide = e_count_guide(tmp_path / "guide")
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = grpo_config(tmp_path, llama64_dir, data, max_steps=3, beta=0.1)
    cfg.guide = GuideSettings(model=str(guide), mode="traces", traces=2)
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    assert len(metrics) == 3
    for m in metrics:
        assert m["guide/traces"] == 2
        assert m["sampler/logp_diff/max"] < 1e-3, m
        assert m["sampler/frac_masked"] == 0, m
        # the guide's traces are made of the tokens richest in 'e's: they score far above the policy's own
        assert m["guide/reward_traces"] > m["guide/reward_policy"] + 1, m
