"""alignkit ppo: a tiny causal and a tiny T5 policy learn an easy reward, the first ratio is exactly 1,
the adaptive KL coefficient moves toward its target, an interrupted run resumes bit for bit (critic and
KL controller included), and settings are checked before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

import alignkit.algorithms.ppo as ppo
import alignkit.training.loop as online_loop
import alignkit.training.order as order
from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError
from alignkit.config.online import PPOConfig
from alignkit.training.loop import RunInterrupted
from tests.conftest import train_metrics, write_prompts

E_COUNT = [{"type": "regex", "pattern": "e", "mode": "count"}]


def config(tmp_path, model, data, **overrides) -> PPOConfig:
    base = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / "out"),
        rewards=E_COUNT,
        batch_size=8,
        generation=GenerationSettings(max_new_tokens=8),
        lr=1e-2,
        vf_lr=1e-2,  # the critic at lr, as these tests were calibrated (the default, 10 x lr, is 0.1 here)
        kl_coef=0.0,
        save_steps=0,
        eval_steps=1000,
        progress=False,
        seed=1,
    )
    base.update(overrides)
    return PPOConfig(**base)


def test_a_tiny_causal_policy_learns_an_easy_reward(tmp_path, tiny_model_dir):
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=25, kl_coef=0.01)
    ppo.train(cfg)
    metrics = train_metrics(cfg)
    rewards = [m["reward"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 3, rewards  # "e"s per 8-token completion: measured 3.6 -> 16 at step 25
    # The critic follows the returns: its mean value rises from 0 toward the rising score.
    assert metrics[0]["values/mean"] == 0.0 and metrics[-1]["values/mean"] > 3
    for key in ("value_loss", "explained_variance", "value_clip_frac", "returns/mean", "kl_coef", "kl_ref"):
        assert key in metrics[-1]
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_a_tiny_t5_policy_learns_an_easy_reward(tmp_path, tiny_t5_dir):
    """Encoder-decoder: the prompt is the source, the completion is the decoder's own sequence; the
    saved model is a seq2seq LM that generates with the learned preference."""
    from transformers import AutoModelForSeq2SeqLM

    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, tiny_t5_dir, data, max_steps=12, lr=3e-3, kl_coef=0.01, eval_fraction=0.25)
    ppo.train(cfg)
    rewards = [m["reward"] for m in train_metrics(cfg)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 2, rewards
    final = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out" / "final")
    assert final.config.is_encoder_decoder
    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    assert [m["step"] for m in lines if m["split"] == "eval"] == [12]


def test_the_first_ratio_is_exactly_one_with_dropout_in_the_config(tmp_path, monkeypatch):
    """Dropout asked for in the checkpoint is turned off in policy, critic and reference, and the old
    log-probs are taken in the training micro-batches: before the first update π/π_old is exactly 1,
    with 2 epochs x 2 minibatches x 2 micro-batches."""
    from conftest import build_tiny_llama
    from transformers import AutoConfig

    model_dir = build_tiny_llama(tmp_path / "m")
    cfg_json = AutoConfig.from_pretrained(model_dir)
    cfg_json.attention_dropout = 0.3
    cfg_json.save_pretrained(model_dir)
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    seen = []
    real = ppo.clipped_surrogate

    def spy(logps, old_logps, advantages, mask, **kwargs):
        seen.append((logps.detach().clone(), old_logps.clone(), mask.clone()))
        return real(logps, old_logps, advantages, mask, **kwargs)

    monkeypatch.setattr(ppo, "clipped_surrogate", spy)
    cfg = config(
        tmp_path, model_dir, data, max_steps=1, ppo_epochs=2, minibatch_size=4, grad_accum=2, kl_coef=0.1
    )
    ppo.train(cfg)
    assert len(seen) == 2 * 2 * 2
    logps, old, mask = seen[0]
    assert torch.equal(logps[mask.bool()], old[mask.bool()])
    logps, old, mask = seen[-1]
    assert not torch.equal(logps[mask.bool()], old[mask.bool()])


def test_a_t5_policy_with_top_k_is_scored_under_the_distribution_it_sampled(
    tmp_path, tiny_t5_dir, monkeypatch
):
    """PPO on a T5 policy (sampled through generate) at τ = 2 with top_k = 5: the old log-probs of every
    completion token equal the log-prob the sampler drew it with (transformers' warpers on the starting
    model's decoder logits), and the reference's are the untruncated softmax at τ. (The tiny T5's next-token
    distributions are peaked, hence τ = 2; untruncated old log-probs, the old scoring, were 0.20 nats off
    on average, up to 0.49.)"""
    from test_logprobs import sampler_scores
    from transformers import AutoModelForSeq2SeqLM

    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    passes = []
    real = ppo.token_logps_in_batches

    def spy(forward, rollout, *args, **kwargs):
        out = real(forward, rollout, *args, **kwargs)
        passes.append((rollout, out["token_logps"]))
        return out

    monkeypatch.setattr(ppo, "token_logps_in_batches", spy)
    T, top_k = 2.0, 5
    sampling = GenerationSettings(max_new_tokens=8, temperature=T, top_k=top_k)
    ppo.train(config(tmp_path, tiny_t5_dir, data, max_steps=1, kl_coef=0.1, generation=sampling))
    (rollout, old), (_, ref) = passes  # the sampling policy's pass, then the reference's
    start = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    with torch.no_grad():
        logits = (
            start(
                input_ids=rollout.encoder_input_ids,
                attention_mask=rollout.encoder_attention_mask,
                decoder_input_ids=rollout.input_ids,
                decoder_attention_mask=rollout.attention_mask,
            )
            .logits[:, :-1]
            .float()
        )  # (N, L, V)
        scores = sampler_scores(logits.reshape(-1, logits.shape[-1]), T, top_k, None).view_as(logits)
    targets = rollout.input_ids[:, 1:, None]
    mask = rollout.completion_mask[:, 1:].bool()
    sampler = scores.log_softmax(-1).gather(-1, targets)[..., 0]
    untruncated = (logits / T).log_softmax(-1).gather(-1, targets)[..., 0]
    torch.testing.assert_close(old[:, 1:][mask], sampler[mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(ref[:, 1:][mask], untruncated[mask], atol=2e-5, rtol=0)
    assert (sampler - untruncated)[mask].mean() > 0.1


@pytest.mark.parametrize("seed", [18_283, 2**32 - 1])
def test_the_largest_seeds_train(tmp_path, tiny_model_dir, seed):
    """Every accepted seed trains: a step's minibatch shuffles are seeded from seed x 1_000_003 x 1009
    x 1_000_003, past 2**64 above seed 18,282 (the first step crashed with an overflow)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=1, ppo_epochs=2, minibatch_size=4, seed=seed)
    ppo.train(cfg)
    assert train_metrics(cfg)[0]["updates"] == 4


def test_a_large_step_seed_shuffles_as_its_low_32_bits():
    """The CPU generator (mt19937) reads only the low 32 bits of its seed; the derived seeds are reduced
    modulo 2**64, which keeps those bits, so a seed below the old overflow keeps its order and a seed
    above it shuffles as its low 32 bits do."""
    cfg = PPOConfig(ppo_epochs=3, minibatch_size=4)
    big = ((2**32 - 1) * 1_000_003 + 5) * 1009  # the step seed of seed 2**32 - 1 at step 5
    assert order.minibatches(16, cfg, big) == order.minibatches(16, cfg, big % 2**32)


def test_the_adaptive_kl_coefficient_moves_toward_its_target(tmp_path, tiny_model_dir):
    """β follows the controller's rule every step: down while the KL per completion is under the tiny
    target (step 1: the policy is the reference, KL 0), up by 1.1x a step once the policy moved away.
    The per-completion KL estimate is noisy while the policy is still near the reference (measured: its
    sign alternates over steps 2-5 with one sampling stream and not with another), so the rise is checked
    over the last two of 8 steps."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=8, kl_coef=0.05, target_kl=1e-4, kl_horizon=16)
    ppo.train(cfg)
    metrics = train_metrics(cfg)
    coefs = [m["kl_coef"] for m in metrics]  # β used by each step's rollout
    assert coefs[0] == 0.05
    for m, before, after in zip(metrics, coefs, coefs[1:]):
        error = min(max(m["kl_ref"] / 1e-4 - 1, -0.2), 0.2)
        assert after == pytest.approx(before * (1 + error * 8 / 16))
        assert (after > before) == (m["kl_ref"] > 1e-4)  # up while the KL is above target, else down
    # The policy has moved: the KL is far above target (the error clips at 0.2), so β rose 1.1x each step.
    assert all(m["kl_ref"] > 1.2e-4 for m in metrics[-3:-1])
    assert coefs[-1] == pytest.approx(coefs[-3] * 1.1**2)


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch):
    data = write_prompts(tmp_path / "prompts.jsonl")
    settings = dict(
        max_steps=6, kl_coef=0.05, target_kl=0.01, kl_horizon=100, reward_normalize=True, save_steps=2
    )
    whole = config(tmp_path / "a", tiny_model_dir, data, **settings)
    ppo.train(whole)
    expected = train_metrics(whole)

    cut = config(tmp_path / "b", tiny_model_dir, data, **settings)
    calls = {"n": 0}
    real = online_loop.collect

    def interrupt_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(online_loop, "collect", interrupt_at_step_4)
    with pytest.raises(RunInterrupted):
        ppo.train(cut)
    monkeypatch.setattr(online_loop, "collect", real)
    cut.resume = True
    ppo.train(cut)
    resumed = train_metrics(cut)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(expected, resumed):
        same = {k: a[k] for k in a if not k.startswith(("time/", "tokens/s"))}
        assert same == {k: b[k] for k in same}, a["step"]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_steps_updates_never_saves_a_half_step(
    tmp_path, tiny_model_dir, monkeypatch, presses
):
    """Ctrl-C (a real SIGINT) at the second of step 3's two optimizer steps. Once: step 3 is finished and
    saved as checkpoint-3, exit 130. Twice (more than a second apart): step 3 is dropped, nothing is
    saved and checkpoint-2 is left as it was. Either way the resumed run's every metric equals the
    uninterrupted run's. (Before: the half-updated weights and the normaliser, which had seen step 3's
    scores, were saved as step 2 over checkpoint-2.)"""
    import os
    import signal
    import time

    data = write_prompts(tmp_path / "prompts.jsonl")
    settings = dict(
        max_steps=4, ppo_epochs=2, kl_coef=0.05, target_kl=0.01, kl_horizon=100, reward_normalize=True,
        save_steps=2,
    )  # fmt: skip
    whole = config(tmp_path / "a", tiny_model_dir, data, **settings)
    ppo.train(whole)
    expected = train_metrics(whole)

    cut = config(tmp_path / "b", tiny_model_dir, data, **settings)
    checkpoints = tmp_path / "b" / "out" / "checkpoints"
    real, calls, saved = ppo.optimizer_step, {"n": 0}, {}

    def ctrl_c_at_the_sixth_update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # step 3 (2 updates a step), its second update
            saved.update({p.name: p.read_bytes() for p in (checkpoints / "checkpoint-2").iterdir()})
            for press in range(presses):
                if press:
                    time.sleep(1.1)  # (a repeat within a second is a launcher forwarding the same one)
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo, "optimizer_step", ctrl_c_at_the_sixth_update)
    with pytest.raises(RunInterrupted) as stopped:
        ppo.train(cut)
    assert stopped.value.dropped == (presses == 2) and stopped.value.step == 3 - stopped.value.dropped
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == (["checkpoint-2", "checkpoint-3"] if presses == 1 else ["checkpoint-2"])
    assert {p.name: p.read_bytes() for p in (checkpoints / "checkpoint-2").iterdir()} == saved
    monkeypatch.setattr(ppo, "optimizer_step", real)
    cut.resume = True
    ppo.train(cut)
    resumed = train_metrics(cut)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(expected, resumed):
        same = {k: a[k] for k in a if not k.startswith(("time/", "tokens/s"))}
        assert same == {k: b[k] for k in same}, a["step"]


def test_lora_policy_and_critic_with_the_adapter_off_as_the_reference(tmp_path, tiny_model_dir):
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=3, kl_coef=0.1, lr=3e-2)
    cfg.lora.enabled = True
    cfg.reference.mode = "adapter"
    ppo.train(cfg)
    metrics = train_metrics(cfg)
    assert metrics[0]["kl_ref"] == 0.0 and metrics[-1]["kl_ref"] != 0.0
    assert (tmp_path / "out" / "final" / "adapter_config.json").exists()


def test_missing_eos_penalty_and_reward_shaping_by_hand():
    """Two completions, scores [1, 2], the second without EOS, penalty 0.5, β = 0.1, γ = 1, λ = 1:
    row 0: tokens at 1, 2; k1 = [0.2, −0.1]; r = [−0.02, 0.01 + 1] -> returns [0.99, 1.01]
    row 1: token at 1 only; k1 = 0.3; r = −0.03 + (2 − 0.5) = 1.47 -> return 1.47 (values 0)."""
    from alignkit.rollout import Rollout

    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    rollout = Rollout(
        input_ids=torch.zeros(2, 3, dtype=torch.long),
        attention_mask=torch.ones(2, 3, dtype=torch.long),
        completion_mask=mask,
        prompt_lengths=[1, 1],
        completion_lengths=[2, 1],
        ended=torch.tensor([True, False]),
        prompts=["a", "b"],
        completions=["x", "y"],
        scores=torch.tensor([1.0, 2.0]),
        source_scores={},
        reward_stats={},
        group_size=1,
        old_logps=torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, 0.0]]),
        ref_logps=torch.tensor([[0.0, -1.2, -1.9], [0.0, -1.3, 0.0]]),
        old_values=torch.zeros(2, 3),
    )
    cfg = PPOConfig(missing_eos_penalty=0.5, gamma=1.0, lam=1.0)
    shaped = ppo.shape_rewards(cfg, rollout, kl_coef=0.1)
    torch.testing.assert_close(shaped["scores"], torch.tensor([1.0, 1.5]))
    torch.testing.assert_close(shaped["returns"], torch.tensor([[0.0, 0.99, 1.01], [0.0, 1.47, 0.0]]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rewards": []}, "rewards is empty"),
        ({"kl_coef": -1.0}, "'kl_coef' must be"),
        ({"target_kl": 0.0}, "'target_kl' must be"),
        ({"target_kl": 1.0, "kl_coef": 0.0}, "target_kl .* needs a starting kl_coef > 0"),
        ({"kl_horizon": 500}, "kl_horizon=500 has no effect without target_kl"),
        ({"gamma": 1.5}, "'gamma' must be"),
        ({"vf_coef": 0.0}, "'vf_coef' must be"),
        ({"minibatch_size": 3}, "minibatch_size=3 must divide the rollout"),
        ({"reference": {"mode": "precomputed"}}, "does not apply to online training"),
        (
            {"kl_coef": 0.0, "reference": {"mode": "copy", "model": "other"}},
            "reference.model=other has no effect with kl_coef=0",
        ),
    ],
)
def test_settings_are_checked_before_anything_loads(tmp_path, overrides, message):
    from alignkit.config.base import ReferenceSettings

    if "reference" in overrides:
        overrides = {**overrides, "reference": ReferenceSettings(**overrides["reference"])}
    cfg = config(tmp_path, "/nowhere", "/nowhere.jsonl", kl_coef=overrides.pop("kl_coef", 0.1), **overrides)
    with pytest.raises(ConfigError, match=message):
        ppo.check_settings(cfg)


@pytest.mark.skipif(
    not __import__("alignkit.training.setup").training.setup.native_bf16(),
    reason="this CPU has no native bf16",
)
def test_under_bf16_autocast_the_adapter_off_reference_equals_the_untrained_policy(tmp_path, tiny_model_dir):
    """mixed_precision=bf16 (what auto picks on a CPU with AVX512-BF16): the reference runs under the same
    autocast as the policy, so with a fresh (zero) LoRA adapter the KL at the first rollout is exactly 0,
    and the policy still learns."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=3, kl_coef=0.1, lr=3e-2, mixed_precision="bf16")
    cfg.lora.enabled = True
    cfg.reference.mode = "adapter"
    ppo.train(cfg)
    metrics = train_metrics(cfg)
    assert metrics[0]["kl_ref"] == 0.0 and metrics[-1]["kl_ref"] != 0.0


def test_a_critic_from_a_reward_model_starts_at_its_scores(tmp_path, tiny_model_dir):
    """value_model=PATH: the critic is the reward model's backbone and head, so its value at position t
    is the reward model's score read at t - 1 (the state in which token t is chosen), 0 at position 0."""
    from alignkit.models.load import load_causal_lm
    from alignkit.models.reward import load_reward_model
    from alignkit.models.value import value_model_from

    rm = load_reward_model(str(tiny_model_dir), pad_token_id=0)
    torch.nn.init.normal_(rm.score.weight)  # a head that is not all zeros
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    policy = load_causal_lm(str(tiny_model_dir))
    cfg = PPOConfig(model=str(tiny_model_dir))
    critic = value_model_from(policy, str(tmp_path / "rm"), cfg, "cpu").eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        values = critic(batch)
        per_position = rm.score(rm.model(input_ids=ids).last_hidden_state).squeeze(-1)  # (1, T)
    torch.testing.assert_close(values[:, 1:], per_position[:, :-1])
    assert values[0, 0] == 0
    # The default critic starts at 0 everywhere and does not share weights with the policy.
    fresh = value_model_from(policy, "policy", cfg, "cpu")
    with torch.no_grad():
        assert torch.equal(fresh(batch), torch.zeros(1, 5))
    assert fresh.backbone.embed_tokens.weight is not policy.model.embed_tokens.weight


@pytest.mark.parametrize("tiny", ["tiny_model_dir", "tiny_t5_dir"])
def test_the_critic_as_a_second_adapter_on_the_shared_base(tmp_path, tiny, request):
    """value_model=adapter: policy and critic are two LoRA adapters on ONE frozen base (no copy of the
    base weights), both train from one backward, the base does not move, the reference is the base with
    every adapter off (KL 0 at the first rollout), and the saved model is the policy's adapter alone."""
    from safetensors.torch import load_file

    import alignkit.models.value as value_models

    model_dir = request.getfixturevalue(tiny)
    seen = {}
    real = value_models.value_adapter_on

    def spy(policy, lora_config, device):
        value = real(policy, lora_config, device)
        seen["policy"], seen["value"] = policy, value
        seen["start"] = {n: p.detach().clone() for n, p in policy.named_parameters()}
        return value

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(ppo, "value_adapter_on", spy)
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(
        tmp_path, model_dir, data, max_steps=3, kl_coef=0.1, lr=3e-2, value_model="adapter", save_steps=2
    )
    cfg.lora.enabled = True
    cfg.reference.mode = "adapter"
    try:
        ppo.train(cfg)
    finally:
        monkeypatch.undo()
    policy, value = seen["policy"], seen["value"]
    base = policy.get_base_model()
    assert any(value.backbone is m for m in base.modules())  # the critic runs on the policy's own modules
    moved = {n for n, p in seen["start"].items() if n in dict(policy.named_parameters())}
    moved = {n for n in moved if not torch.equal(seen["start"][n], dict(policy.named_parameters())[n])}
    assert any(".lora_A.default." in n or ".lora_B.default." in n for n in moved)  # the policy's adapter
    assert not any("lora_" not in n for n in moved)  # the base never moves
    metrics = train_metrics(cfg)
    assert metrics[0]["kl_ref"] == 0.0 and metrics[-1]["values/mean"] != 0.0  # the critic's head learned
    # The critic's adapter trained too (its lora_B starts at zero), as the step-2 checkpoint holds it.
    checkpoint = load_file(str(tmp_path / "out" / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    value_b = [t for n, t in checkpoint.items() if ".lora_B.value." in n]
    assert value_b and any(t.abs().sum() > 0 for t in value_b)
    saved = load_file(str(tmp_path / "out" / "final" / "adapter_model.safetensors"))
    assert (
        saved
        and not any(".value." in n for n in saved)
        and not (tmp_path / "out" / "final" / "value").exists()
    )


def test_early_stop_at_an_approx_kl_ends_the_rollouts_epochs(tmp_path, tiny_model_dir):
    """early_stop_kl: the first minibatch of a rollout is always taken (its approx KL to the sampling
    policy is exactly 0: ratio 1); once a minibatch's approx KL exceeds the threshold the rollout's
    remaining epochs are skipped. With a tiny threshold and a large lr, every step stops after 2 of its
    4 epochs x 2 minibatches; without it, all 8 run."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    common = dict(max_steps=2, ppo_epochs=4, minibatch_size=4, lr=5e-2)
    ppo.train(config(tmp_path / "a", tiny_model_dir, data, early_stop_kl=1e-9, **common))
    assert [m["updates"] for m in train_metrics(config(tmp_path / "a", tiny_model_dir, data))] == [2, 2]
    ppo.train(config(tmp_path / "b", tiny_model_dir, data, **common))
    assert [m["updates"] for m in train_metrics(config(tmp_path / "b", tiny_model_dir, data))] == [8, 8]


@pytest.mark.parametrize("value_model", ["policy", "adapter"])
def test_critic_warmup_holds_the_policy_and_vf_lr_is_the_critics(tmp_path, tiny_model_dir, value_model):
    """critic_warmup=2 with 1 update per step: the first 2 steps' updates move the critic only (the policy's
    learning rate is 0: its weights are bit-identical after step 2), step 3 moves the policy too; the logged lr
    (the policy's) is 0 then lr; the critic's group runs at vf_lr. With value_model=adapter the groups split the
    two adapters on one base."""
    import alignkit.training.step as step_module

    seen = {}
    real = step_module.make_optimizer

    def spy(model, cfg, steps, *, groups=None):
        optimizer, scheduler = real(model, cfg, steps, groups=groups)
        seen["optimizer"], seen["module"] = optimizer, model
        seen["lrs"] = []
        return optimizer, scheduler

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(ppo, "make_optimizer", spy)
    snapshots = []
    real_finish = online_loop.OnlineRun.finish_step

    def finish(self, record, *args, **kwargs):
        policy = seen["module"].policy
        snapshots.append({n: p.detach().clone() for n, p in policy.named_parameters() if "value" not in n})
        seen["lrs"].append([g["lr"] for g in seen["optimizer"].param_groups])
        return real_finish(self, record, *args, **kwargs)

    monkeypatch.setattr(online_loop.OnlineRun, "finish_step", finish)
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(
        tmp_path,
        tiny_model_dir,
        data,
        max_steps=3,
        ppo_epochs=1,
        critic_warmup=2,
        vf_lr=5e-2,
        lr_scheduler="constant",
        value_model=value_model,
    )
    if value_model == "adapter":
        cfg.lora.enabled = True
    try:
        ppo.train(cfg)
    finally:
        monkeypatch.undo()
    policy_group, critic_group = seen["optimizer"].param_groups
    assert critic_group["initial_lr"] == 5e-2 and policy_group["initial_lr"] == 1e-2
    assert not {id(p) for p in policy_group["params"]} & {id(p) for p in critic_group["params"]}
    start = snapshots[0]
    same = [all(torch.equal(s[n], start[n]) for n in start) for s in snapshots]
    # Snapshots after steps 1, 2, 3 (the first equals the initial weights): the policy moves at step 3 only.
    assert same == [True, True, False]
    assert [lrs[0] for lrs in seen["lrs"]] == [0.0, 1e-2, 1e-2]  # the lr of the next update, after each step
    metrics = train_metrics(cfg)
    assert [m["lr"] for m in metrics] == pytest.approx([0.0, 0.0, 1e-2])
    assert metrics[1]["values/mean"] != 0.0  # the critic learned during the warm-up
