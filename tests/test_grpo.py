"""alignkit grpo (GRPO, Dr. GRPO, RLOO, REINFORCE++): the first ratio is exactly 1, a tiny policy learns an
easy reward with every estimator, resume is bit-for-bit, masks come from lengths (pad == EOS is safe),
and bad prompts or reward sources fail before training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import alignkit.algorithms.grpo as grpo
import alignkit.training.loop as online_loop
from alignkit.cli import main
from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError
from alignkit.config.online import GRPOConfig
from alignkit.data.readers import DataError
from alignkit.losses.policy_losses import POLICY_LOSSES
from alignkit.rollout import layout
from alignkit.training.loop import RunInterrupted

# The easy reward: how many times the letter "e" appears in the completion. A random tiny policy writes
# random pieces of the TinyStories vocabulary; pieces with an "e" in them are easy to prefer.
from tests.conftest import ctrl_c, train_metrics, write_prompts

E_COUNT = [{"type": "regex", "pattern": "e", "mode": "count"}]


def config(tmp_path, model, data, **overrides) -> GRPOConfig:
    base = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / "out"),
        rewards=E_COUNT,
        batch_size=4,
        num_generations=4,
        generation=GenerationSettings(max_new_tokens=8),
        lr=1e-2,
        beta=0.0,
        save_steps=0,
        eval_steps=1000,
        progress=False,
        seed=1,
    )
    base.update(overrides)
    return GRPOConfig(**base)


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_a_tiny_policy_learns_an_easy_reward(tmp_path, tiny_model_dir, advantage):
    data = write_prompts(tmp_path / "prompts.jsonl")
    # lr 3e-2: at 1e-2 the gain over 30 steps was within the sampling noise of the seed (measured -0.2..+1.4
    # over seeds 1-2); at 3e-2 it was +2.5..+19.6 over seeds 1-3 for all four estimators.
    cfg = config(tmp_path, tiny_model_dir, data, advantage=advantage, max_steps=30, lr=3e-2)
    grpo.train(cfg)
    rewards = [m["reward"] for m in train_metrics(cfg)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.8, (advantage, rewards)  # more "e"s per 8-token completion


def test_the_first_ratio_is_exactly_one_with_dropout_in_the_config(tmp_path, monkeypatch):
    """The checkpoint's config asks for dropout; the trainer turns it off, and log-probs of the sampling
    policy are taken in the training micro-batches, so before the first update π/π_old is exactly 1 —
    even with several epochs and minibatches, and with the KL term on."""
    from conftest import build_tiny_llama
    from transformers import AutoConfig

    model_dir = build_tiny_llama(tmp_path / "m")
    cfg_json = AutoConfig.from_pretrained(model_dir)
    cfg_json.attention_dropout = 0.3
    cfg_json.save_pretrained(model_dir)
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    seen = []
    real = POLICY_LOSSES["grpo"].fn

    def spy(logps, old_logps, advantages, mask, **kwargs):
        seen.append((logps.detach().clone(), old_logps.clone(), mask.clone()))
        return real(logps, old_logps, advantages, mask, **kwargs)

    monkeypatch.setitem(POLICY_LOSSES, "grpo", dataclasses.replace(POLICY_LOSSES["grpo"], fn=spy))
    cfg = config(
        tmp_path, model_dir, data, max_steps=1, ppo_epochs=2, minibatch_size=8, grad_accum=2, beta=0.1
    )
    grpo.train(cfg)
    assert len(seen) == 2 * 2 * 2  # 2 epochs x 2 minibatches of 8 x 2 micro-batches
    logps, old, mask = seen[0]
    assert torch.equal(logps[mask.bool()], old[mask.bool()])  # ratio exactly 1: same bits
    logps, old, mask = seen[-1]
    assert not torch.equal(logps[mask.bool()], old[mask.bool()])  # and after updates it moves


def test_with_top_p_the_old_logps_are_the_samplers_and_the_reference_is_untruncated(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A GRPO step sampling at τ = 0.7 with top_p = 0.8 (several minibatches, so the sampling policy's
    log-probs are a pass of their own): the old log-probs of every completion token equal the log-prob the
    sampler drew it with (transformers' temperature and top-p warpers on the starting model's logits), the
    reference's are the untruncated softmax at τ (the KL is KL(π_trunc ‖ π_ref,τ)), and before the first
    update the ratio is still exactly 1. Untruncated old log-probs (the old scoring) were ~0.2 nats off."""
    from test_logprobs import sampler_scores
    from transformers import AutoModelForCausalLM

    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    passes, ratios = [], []
    real_pass, real_surrogate = grpo.token_logps_in_batches, POLICY_LOSSES["grpo"].fn

    def spy_pass(forward, rollout, *args, **kwargs):
        out = real_pass(forward, rollout, *args, **kwargs)
        passes.append((rollout, out["token_logps"]))
        return out

    def spy_surrogate(logps, old_logps, *args, **kwargs):
        ratios.append((logps.detach().clone(), old_logps.clone(), args[1].clone()))
        return real_surrogate(logps, old_logps, *args, **kwargs)

    monkeypatch.setattr(grpo, "token_logps_in_batches", spy_pass)
    monkeypatch.setitem(POLICY_LOSSES, "grpo", dataclasses.replace(POLICY_LOSSES["grpo"], fn=spy_surrogate))
    T, top_p = 0.7, 0.8
    cfg = config(
        tmp_path,
        tiny_model_dir,
        data,
        max_steps=1,
        minibatch_size=8,
        beta=0.1,
        generation=GenerationSettings(max_new_tokens=8, temperature=T, top_p=top_p),
    )
    grpo.train(cfg)
    (rollout, old), (_, ref) = passes  # the sampling policy's pass, then the reference's
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = start(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, :-1]
        scores = sampler_scores(logits.float().reshape(-1, logits.shape[-1]), T, None, top_p)
    targets = rollout.input_ids[:, 1:, None]
    sampler = scores.view_as(logits).log_softmax(-1).gather(-1, targets)[..., 0]  # (N, L)
    untruncated = (logits.float() / T).log_softmax(-1).gather(-1, targets)[..., 0]
    mask = rollout.completion_mask[:, 1:].bool()
    torch.testing.assert_close(old[:, 1:][mask], sampler[mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(ref[:, 1:][mask], untruncated[mask], atol=2e-5, rtol=0)
    assert (sampler - untruncated)[mask].mean() > 0.1  # truncation moved every token's log-prob up
    logps, old_mb, loss_mask = ratios[0]
    assert torch.equal(logps[loss_mask.bool()], old_mb[loss_mask.bool()])


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch):
    data = write_prompts(tmp_path / "prompts.jsonl")
    whole = config(tmp_path / "a", tiny_model_dir, data, max_steps=6, beta=0.05, reward_normalize=True)
    grpo.train(whole)
    expected = train_metrics(whole)

    cut = config(tmp_path / "b", tiny_model_dir, data, max_steps=6, beta=0.05, reward_normalize=True)
    calls = {"n": 0}
    real = online_loop.collect

    def interrupt_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            ctrl_c()  # (step 5 is finished and saved)
        return real(*args, **kwargs)

    monkeypatch.setattr(online_loop, "collect", interrupt_at_step_5)
    with pytest.raises(RunInterrupted):
        grpo.train(cut)
    monkeypatch.setattr(online_loop, "collect", real)
    cut.resume = True
    grpo.train(cut)
    resumed = train_metrics(cut)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(expected, resumed):
        same = {k: a[k] for k in a if not k.startswith(("time/", "tokens/s"))}
        assert same == {k: b[k] for k in same}, a["step"]


def test_a_large_seed_trains_with_several_updates_per_rollout(tmp_path, tiny_model_dir):
    """seed 18,283 with 2 updates per rollout: the minibatch shuffle's derived seed passes 2**64 (it
    crashed the first step with an overflow)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=1, ppo_epochs=2, seed=18_283)
    grpo.train(cfg)
    assert train_metrics(cfg)[0]["step"] == 1


def test_the_eval_reward_is_raw_with_a_reward_normaliser(tmp_path, tiny_model_dir):
    """reward_normalize=true: training uses normalised rewards, but the eval reward is the weighted sum of
    the sources' raw scores (here 2 x the "e" count), comparable from one eval to the next; normalised by
    the moving training statistics it changed with them."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    rewards = [{**E_COUNT[0], "name": "e", "weight": 2.0}]
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=2, eval_steps=1, eval_fraction=0.25)
    cfg.rewards, cfg.reward_normalize = rewards, True
    grpo.train(cfg)
    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    evals = [m for m in lines if m["split"] == "eval"]
    assert len(evals) == 2 and evals[0]["rewards/e/mean"] > 0
    for m in evals:
        assert m["reward"] == pytest.approx(2 * m["rewards/e/mean"])


def test_masks_come_from_lengths_so_pad_equal_to_eos_is_safe():
    """pad id = EOS id = 2: the EOS that ends a completion is scored, the padding after it is not."""
    input_ids, attention_mask, completion_mask = layout(
        [[1, 5, 6], [1, 5]], [[7, 2], [8, 9, 10, 2]], pad_id=2
    )
    assert input_ids.tolist() == [[1, 5, 6, 7, 2, 2], [1, 5, 8, 9, 10, 2]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert completion_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]


def test_bad_prompts_and_reward_sources_fail_before_training(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": ""}\n{"question": "x"}\n')
    with pytest.raises(DataError) as err:
        grpo.train(config(tmp_path, tiny_model_dir, str(bad), max_steps=1))
    message = str(err.value)
    assert (
        f"{bad}:2: field 'prompt': empty prompt" in message and f"{bad}:3: field 'prompt': missing" in message
    )
    data = write_prompts(tmp_path / "prompts.jsonl")
    args = ["grpo", f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path}/o"]
    assert main([*args, "rewards=[{type: vadr}]"]) != 0
    assert "vadr" in capsys.readouterr().err
    assert main([*args, "rewards=[{type: classifier, model: /nowhere/clf}]"]) != 0
    assert "/nowhere/clf" in capsys.readouterr().err
    cost = "rewards=[{type: vader}, {type: length, cost_threshold: 10}]"
    assert main([*args, cost]) != 0
    assert "length set cost_threshold" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rewards": []}, "rewards is empty"),
        ({"minibatch_size": 5}, "minibatch_size=5 must divide the rollout"),
        ({"reference": {"mode": "precomputed"}}, "does not apply to online training"),
        ({"advantage": "rloo", "num_generations": 1}, "needs at least 2 completions"),
        ({"advantage": "rloo", "scale_rewards": "batch"}, "scale_rewards is used by advantage=grpo only"),
        ({"max_length": 99}, "max_length is not used online"),
        ({"loss_aggregation": "mean"}, "loss_aggregation 'mean' is not auto or one of"),
        ({"beta": -1.0}, "'beta' must be >= 0"),
        ({"beta": 0.0, "kl_estimator": "k2"}, "kl_estimator=k2 has no effect with beta=0"),
        ({"beta": 0.0, "kl_importance_correction": True}, "kl_importance_correction=True has no effect with"),
        ({"beta": 0.0, "kl_in_reward": True}, "kl_in_reward=True has no effect with beta=0"),
        (
            {"beta": 0.0, "reference": {"mode": "copy", "model": "other"}},
            "reference.model=other has no effect with beta=0",
        ),
        ({"beta": 0.0, "reference": {"mode": "adapter"}}, "reference.mode=adapter has no effect with beta=0"),
        (
            {"advantage": "rloo", "kl_estimator": "k3"},
            "kl_estimator=k3 cannot be used with the KL in the reward",
        ),
        (
            {"kl_in_reward": True, "kl_estimator": "k2"},
            "kl_estimator=k2 cannot be used with the KL in the reward",
        ),
        (
            {"advantage": "rloo", "kl_importance_correction": True},
            "kl_importance_correction=True has no effect",
        ),
        ({"kl_estimator": "k5"}, "kl_estimator 'k5' is not auto or one of k1, k2, k3"),
    ],
)
def test_settings_are_checked_before_anything_loads(tmp_path, overrides, message):
    from alignkit.config.base import ReferenceSettings

    if "reference" in overrides:
        overrides = {**overrides, "reference": ReferenceSettings(**overrides["reference"])}
    cfg = config(tmp_path, "/nowhere", "/nowhere.jsonl", **{"beta": 0.1, **overrides})
    with pytest.raises(ConfigError, match=message):
        grpo.check_settings(cfg)


def test_kl_settings_are_accepted_with_a_kl_term(tmp_path):
    """The refusals above are about beta=0 only: with a KL term the same settings pass."""
    cfg = config(
        tmp_path, "/nowhere", "/nowhere.jsonl", beta=0.1, kl_estimator="k2", kl_importance_correction=True
    )
    grpo.check_settings(cfg)


@pytest.mark.parametrize(
    "overrides, in_reward, estimator",
    [
        ({"advantage": "grpo"}, False, "k3"),
        ({"advantage": "dr_grpo"}, False, "k3"),
        ({"advantage": "rloo"}, True, "k1"),
        ({"advantage": "reinforce_pp", "num_generations": 1}, True, "k1"),
        ({"advantage": "reinforce_pp"}, False, "k2"),
        ({"advantage": "rloo", "kl_in_reward": False}, False, "k3"),
        ({"advantage": "grpo", "kl_in_reward": True}, True, "k1"),
        ({"advantage": "reinforce_pp", "kl_estimator": "k3"}, False, "k3"),
        ({"advantage": "rloo", "kl_estimator": "k1"}, True, "k1"),
    ],
)
def test_the_kl_goes_where_each_recipe_puts_it(tmp_path, overrides, in_reward, estimator):
    """check_settings resolves kl_in_reward and kl_estimator (saved so in the run's config): the estimator's
    recipe unless the user chose."""
    cfg = grpo.check_settings(config(tmp_path, "/nowhere", "/nowhere.jsonl", beta=0.1, **overrides))
    assert (cfg.kl_in_reward, cfg.kl_estimator) == (in_reward, estimator)


@pytest.mark.parametrize(
    "advantage, G, in_reward, estimator",
    [
        ("rloo", 4, True, None),
        ("reinforce_pp", 1, True, None),
        ("reinforce_pp", 4, False, "k2"),
        ("grpo", 4, False, "k3"),
    ],
)
def test_the_kl_in_the_reward_is_what_the_advantages_see(
    tmp_path, tiny_model_dir, monkeypatch, advantage, G, in_reward, estimator
):
    """With the KL in the reward, the advantages are computed from score − β·Σ_t (log π_old − log π_ref) over
    each completion's tokens and the loss has no KL term; with it in the loss, they see the raw scores and
    the loss calls the recipe's estimator. Step 2, when the policy has moved from the reference."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    rollouts, seen_rewards, estimators = [], [], set()
    real_collect, real_advantages, real_kl = online_loop.collect, grpo.compute_advantages, grpo.kl_estimate

    def collect(*args, **kwargs):
        rollouts.append(real_collect(*args, **kwargs))
        return rollouts[-1]

    def advantages(name, rewards, group_size, **kwargs):
        seen_rewards.append(rewards.clone())
        return real_advantages(name, rewards, group_size, **kwargs)

    def kl(*args, estimator, **kwargs):
        estimators.add(estimator)
        return real_kl(*args, estimator=estimator, **kwargs)

    monkeypatch.setattr(online_loop, "collect", collect)
    monkeypatch.setattr(grpo, "compute_advantages", advantages)
    monkeypatch.setattr(grpo, "kl_estimate", kl)
    cfg = config(
        tmp_path, tiny_model_dir, data, max_steps=2, beta=0.5, advantage=advantage, num_generations=G
    )
    grpo.train(cfg)
    rollout, rewards = rollouts[1], seen_rewards[1]
    if in_reward:
        sequence_kl = ((rollout.old_logps - rollout.ref_logps) * rollout.completion_mask).sum(-1)
        assert sequence_kl.abs().max() > 1e-3  # the policy has moved: the penalty is not 0
        torch.testing.assert_close(rewards, rollout.scores - 0.5 * sequence_kl)
        assert estimators == set()
        mask = rollout.completion_mask.bool()
        kl_metric = train_metrics(cfg)[1]["kl"]
        assert kl_metric == pytest.approx(
            float((rollout.old_logps - rollout.ref_logps)[mask].mean()), rel=1e-5
        )
    else:
        assert torch.equal(rewards, rollout.scores)
        assert estimators == {estimator}


def test_lora_with_the_adapter_off_as_the_reference(tmp_path, tiny_model_dir):
    """LoRA: only the adapter trains, the reference is the base with the adapter switched off (KL 0 at
    the first step, > 0 once the adapter moved), and the saved model is the adapter."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(
        tmp_path, tiny_model_dir, data, max_steps=4, beta=0.1, lr=3e-2, eval_fraction=0.25, eval_steps=2
    )
    cfg.lora.enabled = True
    cfg.reference.mode = "adapter"
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0.0
    assert (tmp_path / "out" / "final" / "adapter_config.json").exists()
    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    evals = [m for m in lines if m["split"] == "eval"]  # one sample of each of the 4 held-out prompts
    assert [m["step"] for m in evals] == [2, 4] and all(0 < m["completion_length"] <= 8 for m in evals)
