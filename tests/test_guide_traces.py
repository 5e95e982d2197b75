"""Guide traces (guide.mode=traces, LUFFY's mixed-policy GRPO): k of each group's G completions written by a
frozen guide alone, the G − k others by the policy; the guide's tokens trained on by LUFFY's policy shaping,
−f(π)·Â with f(π) = π / (π + γ). The shaping by hand, its gradient by autograd and finite differences; the
objective's parts (the policy loss and the KL on the policy's own tokens only); each group's mix, counts and
prompts, drawn as the policy and the guide draw alone; the flags carried through minibatches; the sampler
correction leaving the traces out; an interrupted run whose schedule fades k resumes exactly; the refusals; and
a guide that knows the letter-count reward speeding a tiny policy up."""

from __future__ import annotations

import math

import pytest
import torch

import alignkit.algorithms.grpo as grpo
import alignkit.training.loop as online_loop
from alignkit.config.generation import GenerationSettings
from alignkit.config.guide import GuideSettings
from alignkit.config.load import ConfigError, load_config
from alignkit.config.online import GRPOConfig
from alignkit.generation.backends import ModelSampler
from alignkit.generation.guided import GUIDE_SEED_OFFSET, TracesSampler, guide_trace_ids
from alignkit.generation.sampling import eos_ids, sample_ids
from alignkit.losses.policy import aggregate, kl_estimate
from alignkit.losses.policy_losses import clipped_surrogate
from alignkit.losses.policy_shaping import shaped_guide_loss, shaping_statistics
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rollout import Rollout, sampler_correction
from tests.conftest import build_tiny_llama, interrupt_then_resume, train_metrics, write_prompts
from tests.test_grpo import config as grpo_config
from tests.test_guide import e_per_completion, spy


def traces(cfg, guide, **settings):
    cfg.guide = GuideSettings(model=str(guide), mode="traces", **settings)
    return cfg


def e_count_guide(path, *, boost: float = 0.25, seed: int = 7):
    """A tiny Llama whose head raises each token's logit by 5.6·`boost` nats per letter 'e' in it, whatever the
    context (the constant first coordinate of `tests.test_guide.e_guide`, 5.6 nats per unit): its traces are
    made of the tokens richest in 'e's ("something unexpected happened. The " has 7)."""
    build_tiny_llama(path, seed=seed)
    model, tokenizer = load_causal_lm(str(path)), load_tokenizer(str(path))
    count = torch.tensor([float(tokenizer.decode([i]).count("e")) for i in range(len(tokenizer))])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
        model.lm_head.weight[:, 0] += boost * count
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory):
    return e_count_guide(tmp_path_factory.mktemp("e-count-guide"))


# ---------------------------------------------------------------------------------------------------------------
# The shaping


def test_the_shaped_guide_loss_by_hand():
    """γ = 0.1. Row 0, Â = 2, π = [0.5, 0.1, 0.01] and a masked position (log π = -inf there):
        f(π)     = π / (π + γ) = [5/6, 1/2, 1/11]            loss = −Â·f = [−5/3, −1, −2/11, 0]
        ∂loss/∂log π = −Â·γ·π / (π + γ)² = −0.2·[0.5/0.36, 0.1/0.04, 0.01/0.0121] = [−0.27778, −0.5, −0.16529]
    against −Â·π = [−1, −0.2, −0.02] for the bare π (f = identity): f'(π) = [0.278, 2.5, 8.26] times as much,
    the unlikely token's 8.3x, the likely one's damped. Row 1, Â = −1 (advantages per token, (B, T)), π = 0.2:
        loss = 2/3, ∂loss/∂log π = 0.1·0.2 / 0.09 = 0.22222.
    Nothing leaks from the masked -inf position, neither into the loss nor into the gradient."""
    logps = torch.tensor([[0.5, 0.1, 0.01, 1.0], [0.2, 0.3, 1.0, 1.0]]).log()
    logps[0, 3] = float("-inf")
    logps.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    advantages = torch.tensor([[2.0] * 4, [-1.0] * 4])
    loss = shaped_guide_loss(logps, advantages, mask, gamma=0.1)
    expected = torch.tensor([[-5 / 3, -1, -2 / 11, 0], [2 / 3, 0, 0, 0]])
    torch.testing.assert_close(loss.detach(), expected)
    loss.sum().backward()
    grad = torch.tensor([[-0.2 * 0.5 / 0.36, -0.5, -0.2 * 0.01 / 0.0121, 0], [0.1 * 0.2 / 0.09, 0, 0, 0]])
    torch.testing.assert_close(logps.grad, grad)
    # (B,) advantages broadcast over the tokens, as the policy losses take them
    one = shaped_guide_loss(logps.detach(), torch.tensor([2.0, -1.0]), mask, gamma=0.1)
    torch.testing.assert_close(one, expected)
    with pytest.raises(ValueError, match="gamma=0 must be > 0"):
        shaped_guide_loss(logps.detach(), advantages, mask, gamma=0)


def test_the_shaping_gradient_against_finite_differences():
    """In float64, the gradient of Σ loss_t over random log-probs (π from 1e-4 to 0.9), advantages of both
    signs and a ragged mask, by autograd against central differences (h = 1e-6) on every position."""
    g = torch.Generator().manual_seed(0)
    logps = torch.empty(3, 5, dtype=torch.float64).uniform_(math.log(1e-4), math.log(0.9), generator=g)
    advantages = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    x = logps.clone().requires_grad_(True)
    shaped_guide_loss(x, advantages, mask, gamma=0.1).sum().backward()
    numeric = torch.zeros_like(logps)
    for i in range(3):
        for t in range(5):
            up, down = logps.clone(), logps.clone()
            up[i, t] += 1e-6
            down[i, t] -= 1e-6
            f = lambda z: shaped_guide_loss(z, advantages, mask, gamma=0.1).sum()  # noqa: E731
            numeric[i, t] = (f(up) - f(down)) / 2e-6
    torch.testing.assert_close(x.grad, numeric, atol=1e-7, rtol=1e-6)
    assert (x.grad[mask == 0] == 0).all()


def test_shaping_statistics_by_hand():
    """π = [0.5, 0.1, 0.01, 0.2], γ = 0.1: f'(π) = γ / (π + γ)² = [0.27778, 2.5, 8.26446, 1.11111], mean
    3.03834; f'(π) > 1 where π < √γ − γ = 0.2162: 3 of 4; mean π 0.2025. No tokens: zeros."""
    stats = shaping_statistics(torch.tensor([0.5, 0.1, 0.01, 0.2]).log(), gamma=0.1)
    expected = {
        "prob/mean": 0.2025,
        "shaping_weight/mean": (0.1 / 0.36 + 2.5 + 0.1 / 0.0121 + 0.1 / 0.09) / 4,
        "shaping_weight/min": 0.1 / 0.36,
        "shaping_weight/max": 0.1 / 0.0121,
        "frac_amplified": 0.75,
    }
    assert {k: round(float(v), 5) for k, v in stats.items()} == {k: round(v, 5) for k, v in expected.items()}
    assert all(float(v) == 0 for v in shaping_statistics(torch.zeros(0), gamma=0.1).values())


def test_the_objective_shapes_the_guide_tokens_and_keeps_the_kl_to_the_policys_own():
    """GRPO's objective on a batch of two rows, the second a guide trace (guide_mask), β = 0.1 with a k3 loss
    term, token_mean: the loss is aggregate(clipped surrogate on row 0 + β·k3 on row 0 + the shaped term on row
    1), over all 5 tokens (LUFFY's Z); the guide's tokens' gradient is the shaping's alone, −Â·γπ/(π+γ)²/Z,
    without a KL part; `kl` is the mean over the policy's 3 tokens."""
    cfg = GRPOConfig(
        model="m", data="d", rewards=[{"type": "length"}], beta=0.1, epsilon=0.2, epsilon_high=0.2,
        kl_in_reward=False, kl_estimator="k3", guide=GuideSettings(model="g", mode="traces"),
    )  # fmt: skip
    objective = grpo.GRPOObjective(cfg, "token_mean")
    logps = torch.tensor([[0.3, 0.5, 0.2], [0.05, 0.6, 1.0]]).log().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = {
        "loss_mask": mask,
        "guide_mask": torch.tensor([[0, 0, 0], [1, 1, 0]]),
        "old_logps": torch.tensor([[0.25, 0.5, 0.3], [0.1, 0.1, 0.1]]).log(),
        "ref_logps": torch.tensor([[0.2, 0.4, 0.4], [0.3, 0.3, 0.3]]).log(),
        "advantages": torch.tensor([-0.5, 1.5]),
    }
    model = lambda b: {"token_logps": logps, "token_entropy": torch.zeros(2, 3)}  # noqa: E731
    loss, metrics = objective(model, batch)
    own, guide = torch.tensor([[1, 1, 1], [0, 0, 0]]), torch.tensor([[0, 0, 0], [1, 1, 0]])
    surrogate, _ = clipped_surrogate(logps, batch["old_logps"], batch["advantages"], own)
    kl = kl_estimate(logps, batch["ref_logps"], estimator="k3")
    per_token = surrogate + 0.1 * kl * own + shaped_guide_loss(logps, batch["advantages"], guide, gamma=0.1)
    expected, _ = aggregate(per_token, mask, mode="token_mean")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    pi = torch.tensor([0.05, 0.6])
    torch.testing.assert_close(logps.grad[1, :2], -1.5 * 0.1 * pi / (pi + 0.1) ** 2 / 5)
    torch.testing.assert_close(metrics["kl"], kl.detach()[0].mean())


def test_the_sampler_correction_leaves_the_guide_traces_out():
    """A rollout whose policy rows another engine drew (not the trainer: vLLM's case) beside a guide trace: the
    token_truncate weights are π_old / π_sampler on the policy's tokens and 0 on the guide's (they are shaped,
    never importance-weighted), and the gap figures are the policy tokens' alone."""
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rollout = Rollout(
        input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=completion_mask,
        completion_mask=completion_mask, prompt_lengths=[0, 0], completion_lengths=[2, 3],
        ended=torch.tensor([True, False]), prompts=["a", "a"], completions=["", ""], scores=torch.zeros(2),
        source_scores={}, reward_stats={}, group_size=2, sampler_is_trainer=False,
        sampler_auto_correction="token_truncate",
        sampler_logps=torch.tensor([[0.5, 0.5, 0.0], [0.01, 0.01, 0.01]]).log(),
        old_logps=torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.5, 0.5]]).log(),
        sampler_details={"guide_trace": torch.tensor([0.0, 1.0], dtype=torch.float64)},
    )  # fmt: skip
    weights, record = sampler_correction(rollout, "auto", 3.0)
    torch.testing.assert_close(weights["sampler_weights"], torch.tensor([[1.2, 0.8, 0], [0, 0, 0]]))
    assert record["sampler/logp_diff/max"] == pytest.approx(math.log(1.25))  # not log(50), the guide's


# ---------------------------------------------------------------------------------------------------------------
# The rollout


def test_each_group_holds_k_guide_traces_beside_the_policys_own_samples(
    tmp_path, tiny_model_dir, guide_dir, tokenizer, monkeypatch
):
    """One GRPO step, 4 prompts x G = 4 with k = 1, in 2 minibatches of 2 micro-batches: each group is its
    prompt's 3 completions the policy alone draws from the step's seed (`sample_ids`, bit for bit) and then 1
    the guide alone draws from the seed + GUIDE_SEED_OFFSET (`guide_trace_ids`), every row after its own
    group's prompt; the guide's rows report the guide's own log-probs (a full forward of it); the flags reach
    every micro-batch on exactly the guide's rows, however they were shuffled; the metrics split the reward, and
    the plain importance weights π/g of the guide's tokens are ≪ 1 (median below 0.01).
    At k = 0 the sampler is the policy's own, bit for bit."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = traces(
        grpo_config(tmp_path, tiny_model_dir, data, max_steps=1, minibatch_size=8, grad_accum=2), guide_dir
    )
    rollouts, batches, seeds = [], [], []
    real_collect = online_loop.collect
    monkeypatch.setattr(
        online_loop, "collect", lambda *a, **k: seeds.append(k["seed"]) or real_collect(*a, **k)
    )
    spy(monkeypatch, grpo, rollouts, batches)
    grpo.train(cfg)
    (rollout,), (seed,) = rollouts, seeds
    assert rollout.sampler_details["guide_trace"].tolist() == [0.0, 0.0, 0.0, 1.0] * 4
    prompts = [rollout.input_ids[4 * i, : rollout.prompt_lengths[4 * i]].tolist() for i in range(4)]
    for r in range(16):  # every row after its group's prompt
        assert rollout.input_ids[r, : rollout.prompt_lengths[r]].tolist() == prompts[r // 4]
        assert rollout.prompts[r] == rollout.prompts[4 * (r // 4)]
    policy, guide = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(guide_dir))
    settings = {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 64}
    own = sample_ids(policy, tokenizer, prompts, num_samples=3, seed=seed, backend="loop", **settings)
    eos = eos_ids(policy, tokenizer)
    guide_ids, guide_logps = guide_trace_ids(
        guide, tokenizer, prompts, eos=eos, num_samples=1, seed=seed + GUIDE_SEED_OFFSET, **settings
    )
    expected = [row for i in range(4) for row in own[3 * i : 3 * i + 3] + guide_ids[i : i + 1]]
    assert rollout.completion_ids() == expected
    assert (
        sum(text.count("e") for text in rollout.completions[3::4]) > 4 * 8 * 2
    )  # the guide's: > 2 per token

    r = 3  # the first guide trace: its sampler log-probs are the guide's, from a full forward
    with torch.no_grad():
        z = guide(rollout.input_ids[r : r + 1], attention_mask=rollout.attention_mask[r : r + 1]).logits[0]
    start, n = rollout.prompt_lengths[r], rollout.completion_lengths[r]
    log_g = z[start - 1 : start - 1 + n, : len(tokenizer)].log_softmax(-1)
    log_g = log_g.gather(-1, rollout.input_ids[r, start : start + n, None]).squeeze(-1)
    torch.testing.assert_close(rollout.sampler_logps[r, start : start + n], log_g, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(guide_logps[0]), log_g, atol=2e-5, rtol=0)

    assert len(batches) == 4  # 2 minibatches x 2 micro-batches, shuffled rows
    rows = {tuple(rollout.input_ids[r][rollout.attention_mask[r].bool()].tolist()): r for r in range(16)}
    seen = []
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            r = rows[tuple(batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist())]
            seen.append(r)
            expected_flags = batch["completion_mask"][i] * (1 if r % 4 == 3 else 0)
            assert torch.equal(batch["guide_mask"][i], expected_flags)
    assert sorted(seen) == list(range(16)) and seen != list(range(16))

    record = train_metrics(cfg)[0]
    scores = rollout.scores.view(4, 4)
    assert record["guide/traces"] == 1.0
    assert record["guide/reward_traces"] == pytest.approx(float(scores[:, 3].mean()))
    assert record["guide/reward_policy"] == pytest.approx(float(scores[:, :3].mean()))
    assert 0 < record["guide/prob/mean"] < 0.5 and record["guide/shaping_weight/max"] <= 1 / 0.1
    assert record["guide/ratio/median"] < 0.01  # plain importance weights π/g: a random policy, a sharp guide

    sampler = TracesSampler(guide).for_step(GuideSettings(), 0, 1, ModelSampler("loop"))  # no guide: k = 0
    plain = ModelSampler("loop").sample(policy, tokenizer, prompts, num_samples=4, seed=5, **settings)
    mixed = sampler.sample(policy, tokenizer, prompts, num_samples=4, seed=5, **settings)
    assert sampler.traces == 0 and mixed.completion_ids == plain.completion_ids and mixed.logps == plain.logps


def test_an_interrupted_traces_run_whose_schedule_fades_k_resumes_exactly(
    tmp_path, tiny_model_dir, guide_dir, monkeypatch
):
    """k = 2 of G = 4 fading linearly over 3 of the run's 4 steps, k_s = ⌈2·(3 − s)/3⌉ = 2, 2, 1, 0, with a KL
    term (β = 0.04, k3 in the loss): the run stopped by Ctrl-C after step 2 and resumed logs the figures of the
    uninterrupted one to the bit (the policy's samples, the guide's traces and k are functions of the step)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    settings = {"traces": 2, "schedule": "linear", "steps": 3}
    whole = traces(
        grpo_config(tmp_path / "a", tiny_model_dir, data, max_steps=4, beta=0.04), guide_dir, **settings
    )
    grpo.train(whole)
    expected = train_metrics(whole)
    assert [m["guide/traces"] for m in expected] == [2.0, 2.0, 1.0, 0.0]
    assert "guide/reward_traces" not in expected[3] and "guide/prob/mean" not in expected[3]
    cut = traces(
        grpo_config(tmp_path / "b", tiny_model_dir, data, max_steps=4, beta=0.04), guide_dir, **settings
    )
    resumed = interrupt_then_resume(grpo.train, cut, monkeypatch, online_loop, "collect", 2)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens/s"))} for m in ms]  # noqa: E731
    assert [m["step"] for m in resumed] == [1, 2, 3, 4] and strip(resumed) == strip(expected)


# ---------------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["guide.mode=traces"], "guide.mode=traces has no effect without guide.model"),
        (["guide.model=G", "guide.mode=traces", "num_generations=4", "guide.traces=4"],
         "guide.traces=4 of num_generations=4: .* k must be below G"),
        (["guide.model=G", "guide.mode=traces", "num_generations=1"], "guide.traces=1 of num_generations=1"),
        (["guide.model=G", "guide.mode=traces", "guide.traces=0"], "'guide.traces' must be >= 1"),
        (["guide.model=G", "guide.mode=traces", "guide.gamma=0"], "'guide.gamma' must be > 0"),
        (["guide.model=G", "guide.mode=traces", "guide.alpha=0.5"], "guide.alpha=0.5 is the mixture's weight"),
        (["guide.model=G", "guide.traces=2"], "guide.traces=2 is used by guide.mode=traces only"),
        (["guide.model=G", "guide.gamma=0.2"], "guide.gamma=0.2 is used by guide.mode=traces only"),
        (["guide.model=G", "guide.mode=traces", "guide.steps=3"], "guide.steps=3 is used by guide.schedule=linear"),
    ],
)  # fmt: skip
def test_traces_settings_that_make_no_sense_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOConfig, None, overrides)


def test_traces_settings_that_run(tmp_path, tiny_model_dir, tiny_t5_dir):
    """A linear schedule needs no α; vLLM may draw the policy's part (only the mixture needs the loop). Under
    traces the GRPO estimator's auto aggregation is LUFFY's token_mean (1/Z over every token of the group);
    Dr. GRPO's constant stays (LUFFY's training recipe). A guide the lean loop cannot drive is refused at run
    start, before any weights load."""
    base = ["guide.model=G", "guide.mode=traces"]
    for extra in (
        ["guide.schedule=linear", "guide.steps=5"],
        ["generation.backend=vllm"],
        ["guide.traces=7"],
    ):
        load_config(GRPOConfig, None, base + extra)
    cfg = GRPOConfig(model="m", data="d", rewards=[{"type": "length"}])
    assert grpo.check_settings(cfg).loss_aggregation == "sequence_mean"
    cfg.guide = GuideSettings(model="g", mode="traces")
    assert grpo.check_settings(cfg).loss_aggregation == "token_mean"
    cfg.advantage = "dr_grpo"
    assert grpo.check_settings(cfg).loss_aggregation == "constant"
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = traces(grpo_config(tmp_path / "t5", tiny_model_dir, data, max_steps=1), tiny_t5_dir)
    with pytest.raises(ConfigError, match="samples the guide in the lean loop sampler, which cannot drive"):
        grpo.train(cfg)


# ---------------------------------------------------------------------------------------------------------------
# What guide traces are for


def test_guide_traces_speed_a_tiny_policy_up(tmp_path, tiny_model_dir, guide_dir, tokenizer):
    """15 GRPO steps on the letter count (4 prompts x G = 4 a step, top_k = 20) from the same random policy and
    seed, unguided and with k = 1 trace of the 'e'-count guide in each group (γ = 0.1); then the policy alone
    writes 128 completions (`tests.test_guide.e_per_completion`, untruncated). Measured on 2 AMD EPYC cores
    (torch 2.13, CPU), 'e's per completion after the 15 steps, seeds 1 to 6, unguided / LUFFY's shaping / the
    bare π_θ (f = identity, π_φ = 1: the objective before shaping) / plain importance weights π/g:
        6.5 / 20.4 / 10.4 / 11.0     5.9 / 11.1 / 6.9 / 8.3     10.4 / 15.8 / 14.4 / 8.9
        5.8 / 18.6 / 11.6 / 8.5      13.2 / 13.4 / 9.1 / 6.8    4.2 / 11.9 / 8.7 / 6.3
    The shaped traces ahead of the unguided run on every seed (+0.3 to +13.9) and of both unshaped weightings
    on every seed. Seed 3 (+5.4) must keep +3.0 of it.

    Why top_k = 20: the policy scores a guide token over its kept set plus the token, π ≈ 0.035 at the start,
    where f'(π)·π, the shaping's weight on ∇log π, is 0.2. Untruncated, a random policy gives each of the 2,048
    tokens π ≈ 5e-4, the weight is π/γ ≈ 0.005, and the traces only lower the group's baseline under the
    policy's own samples: 4.3 vs 5.1 'e's per completion at seed 3 (a guide of the whole 'e' vocabulary,
    `tests.test_guide.e_guide`: 4.2 vs 5.1). LUFFY's guide tokens are ones a capable policy finds plausible."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    generation = GenerationSettings(max_new_tokens=8, top_k=20)
    settings = {"max_steps": 15, "lr": 3e-2, "seed": 3, "generation": generation}
    plain = grpo_config(tmp_path / "a", tiny_model_dir, data, **settings)
    grpo.train(plain)
    with_traces = traces(grpo_config(tmp_path / "b", tiny_model_dir, data, **settings), guide_dir)
    grpo.train(with_traces)
    unguided = e_per_completion(f"{plain.output_dir}/final", tokenizer)
    guided_ = e_per_completion(f"{with_traces.output_dir}/final", tokenizer)
    assert guided_ > unguided + 3.0, (guided_, unguided)
