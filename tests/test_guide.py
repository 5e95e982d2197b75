"""Guided rollouts (guide.mode=mixture): tokens drawn from q = α·π_S + (1 − α)·g_S with both models decoding in
lockstep. The mixture by hand and by a chi-square over many draws; the reported log-probs are log q and the
weights π/q, computed again from full forwards of both models; α = 1 is the unguided run bit for bit; the guide
never changes and is never checkpointed; an interrupted guided run resumes exactly; a guide that knows the
letter-count reward speeds a tiny policy up; and the refusals, each with its reason."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import alignkit.algorithms.grpo as grpo
import alignkit.algorithms.ppo as ppo
import alignkit.generation.guided as guided_module
import alignkit.training.loop as online_loop
from alignkit.config.guide import GuideSettings
from alignkit.config.load import ConfigError, load_config
from alignkit.config.online import GRPOConfig, PPOConfig
from alignkit.generation.guided import guided_sample_ids, mixture_log_probs
from alignkit.generation.sampling import sample_ids
from alignkit.models.load import load_causal_lm, load_tokenizer
from tests.conftest import build_tiny_llama, interrupt_then_resume, train_metrics, write_prompts
from tests.test_grpo import config as grpo_config
from tests.test_ppo import config as ppo_config


def e_guide(path, *, boost: float = 2.0, seed: int = 7):
    """A tiny Llama whose head favours every token with an 'e' in it, whatever the context: the residual
    stream's first coordinate is a constant 1 (set in every embedding, written by no attention or MLP output),
    so after the final norm it is positive at every position, and each 'e' token's head row gets `boost` on it:
    'e' tokens' logits are 5.6 nats per unit of boost above the others (measured), 99.4% of the mass at boost 1
    and 99.998% at 2, where a random model puts 38% (their share of the vocabulary)."""
    build_tiny_llama(path, seed=seed)
    model, tokenizer = load_causal_lm(str(path)), load_tokenizer(str(path))
    has_e = torch.tensor(["e" in tokenizer.decode([i]) for i in range(len(tokenizer))])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
        model.lm_head.weight[has_e, 0] += boost
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory):
    return e_guide(tmp_path_factory.mktemp("e-guide"))


def guided(cfg, guide, **settings):
    cfg.guide = GuideSettings(model=str(guide), **settings)
    return cfg


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1)


# ---------------------------------------------------------------------------------------------------------------
# The distribution


def test_the_mixture_by_hand():
    """A tokenizer of 4 tokens; the policy's head has a 5th, padding row, the guide's only 3 rows (no token 3).

    z_π = ln[1, 2, 4, 1, 1], z_g = ln[2, 1, 1], α = 0.25, τ = 1, no truncation:
        π_S = [1, 2, 4, 1] / 8 = [.125, .25, .5, .125]   (the padding row dropped)
        g_S = [2, 1, 1, 0] / 4 = [.5, .25, .25, 0]       (token 3: a row the guide lacks, never drawn from it)
        q   = .25·π_S + .75·g_S = [.40625, .25, .3125, .03125]
        π/q = [.3077, 1, 1.6, 4]: token 3, which only the policy can write, reaches 1/α = 4 and no more.
    top_k = 2 keeps S = {2, 1} (the policy's two largest, taken on its whole head), for both models:
        π_S = [0, 1/3, 2/3, 0], g_S = [0, 1/2, 1/2, 0], q = [0, 11/24, 13/24, 0], π/q = [-, 8/11, 16/13, -]
    τ = 1/2 squares the exponentials: π_S = [1, 4, 16, 1] / 22, g_S = [4, 1, 1, 0] / 6, and at α = 1/2
        q = [1/44 + 1/3, 1/11 + 1/12, 4/11 + 1/12, 1/44]."""
    z_pi = torch.tensor([[1.0, 2, 4, 1, 1]]).log()
    z_g = torch.tensor([[2.0, 1, 1]]).log()
    log_q, _ = mixture_log_probs(z_pi, z_g, alpha=0.25, vocab_size=4, temperature=1.0)
    torch.testing.assert_close(log_q.exp()[0], torch.tensor([0.40625, 0.25, 0.3125, 0.03125]))
    pi = torch.tensor([0.125, 0.25, 0.5, 0.125])
    torch.testing.assert_close(pi / log_q.exp()[0], torch.tensor([0.125 / 0.40625, 1.0, 1.6, 4.0]))

    log_q, scores = mixture_log_probs(z_pi, z_g, alpha=0.25, vocab_size=4, temperature=1.0, top_k=2)
    torch.testing.assert_close(log_q.exp()[0], torch.tensor([0, 11 / 24, 13 / 24, 0]))
    assert torch.equal(scores.isfinite()[0], torch.tensor([False, True, True, False]))

    log_q, _ = mixture_log_probs(z_pi, z_g, alpha=0.5, vocab_size=4, temperature=0.5)
    expected = torch.tensor([1 / 44 + 1 / 3, 1 / 11 + 1 / 12, 4 / 11 + 1 / 12, 1 / 44])
    torch.testing.assert_close(log_q.exp()[0], expected)


def test_mixture_samples_match_the_mixed_softmax(tmp_path, tiny_model_dir, tokenizer):
    """4,000 first tokens of one prompt drawn by the lockstep loop, policy and a guide with a larger head
    (2,112 rows for the tokenizer's 2,048, as Qwen2.5-7B's against 0.5B's), at τ = 0.05 and top_k = 6 (a sharp
    distribution the two models disagree on), α = 0.4: the counts match q, computed here from one forward of
    each model (chi-square, 5 degrees of freedom, p > 0.001), where π_S alone is rejected (p < 1e-6); every
    reported log-prob is log q of its token; no token outside the policy's top 6, none of the guide's padding
    rows."""
    from scipy.stats import chisquare

    guide_dir = build_tiny_llama(tmp_path / "guide", seed=5)
    guide = load_causal_lm(str(guide_dir))
    guide.resize_token_embeddings(2112, mean_resizing=False)
    with torch.no_grad():  # padding rows that would win every draw if they were drawn from
        guide.lm_head.weight[2048:] = guide.lm_head.weight[:64] * 10
    guide.save_pretrained(guide_dir, safe_serialization=True)
    policy, guide = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(guide_dir))
    assert guide.lm_head.weight.shape[0] == 2112

    prompt = tokenizer.encode("Tom went out. It was")
    n, alpha, tau = 4000, 0.4, 0.05
    ids, logps, _ = guided_sample_ids(
        policy, guide, tokenizer, [prompt], alpha=alpha, num_samples=n, max_new_tokens=1,
        temperature=tau, top_k=6, batch_size=n, seed=3,
    )  # fmt: skip
    with torch.no_grad():
        z_pi = policy(torch.tensor([prompt])).logits[0, -1] / tau  # (2048,)
        z_g = guide(torch.tensor([prompt])).logits[0, -1, :2048] / tau  # the padding rows dropped
    kept = z_pi.topk(6).indices
    q = alpha * probabilities(z_pi[kept]) + (1 - alpha) * probabilities(z_g[kept])  # (6,)
    drawn = torch.tensor([row[0] for row in ids])
    assert torch.isin(drawn, kept).all()
    counts = torch.stack([(drawn == k).sum() for k in kept]).double()
    expected = lambda p: p.double() / p.double().sum() * n  # noqa: E731  (sums to n to scipy's tolerance)
    assert chisquare(counts, expected(q)).pvalue > 1e-3, (counts, q * n)
    assert chisquare(counts, expected(probabilities(z_pi[kept]))).pvalue < 1e-6
    reported = torch.tensor([row[0] for row in logps])
    expected = dict(zip(kept.tolist(), q.log().tolist()))
    torch.testing.assert_close(
        reported, torch.tensor([expected[t] for t in drawn.tolist()]), atol=2e-5, rtol=0
    )


# ---------------------------------------------------------------------------------------------------------------
# The correction, end to end


def spy(monkeypatch, module, rollouts: list, batches: list) -> None:
    """Record every rollout `module.train` collects and every micro-batch it trains on."""
    real_collect, real_step = online_loop.collect, module.optimizer_step

    def collect(*args, **kwargs):
        rollouts.append(real_collect(*args, **kwargs))
        return rollouts[-1]

    def step(*args, micro_batches, **kwargs):
        batches.extend(dict(b) for b in micro_batches)
        return real_step(*args, micro_batches=micro_batches, **kwargs)

    monkeypatch.setattr(online_loop, "collect", collect)
    monkeypatch.setattr(module, "optimizer_step", step)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_the_reported_logps_are_log_q_and_the_weights_pi_over_q(
    tmp_path, tiny_model_dir, guide_dir, monkeypatch, algorithm
):
    """One step at α = 0.5 (auto: token_truncate at C = 3 ≥ 1/α). From full forwards (no KV cache) of the
    policy as it sampled and of the guide over every completion: the rollout's sampler log-probs are log q of
    each token, the weights the loss multiplies by are π/q, at most 1/α = 2; and GRPO's advantages are
    centred on the importance-weighted mean in each group (Σ_j W_j A_j = 0, W_j the completion's mean weight),
    PPO's over the rollout's tokens (Σ_t w_t A_t = 0). The evaluation after the step samples the policy alone."""
    data = write_prompts(tmp_path / "prompts.jsonl", 10)
    evals = {"eval_fraction": 0.2, "eval_steps": 1}  # 8 training prompts, 2 held out
    if algorithm == "grpo":
        cfg, module = grpo_config(tmp_path, tiny_model_dir, data, max_steps=1, **evals), grpo
    else:
        cfg, module = (
            ppo_config(tmp_path, tiny_model_dir, data, max_steps=1, batch_size=4, ppo_epochs=1, **evals),
            ppo,
        )
    rollouts, batches, eval_samplers = [], [], []
    spy(monkeypatch, module, rollouts, batches)
    import alignkit.evaluation.policy as evaluation  # (run_evaluator's closure looks it up there)

    real_evaluate = evaluation.evaluate_policy
    monkeypatch.setattr(
        evaluation,
        "evaluate_policy",
        lambda *a, **k: eval_samplers.append(k["sampler"]) or real_evaluate(*a, **k),
    )
    module.train(guided(cfg, guide_dir, alpha=0.5))
    assert len(eval_samplers) == 1 and type(eval_samplers[0]).__name__ == "ModelSampler"
    rollout = rollouts[0]
    policy, guide = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(guide_dir))
    with torch.no_grad():
        pi = policy(rollout.input_ids, attention_mask=rollout.attention_mask).logits.log_softmax(-1)
        g = guide(rollout.input_ids, attention_mask=rollout.attention_mask).logits.log_softmax(-1)
    q = torch.logaddexp(pi + math.log(0.5), g + math.log(0.5))[:, :-1]  # (N, T - 1, V): predicts tokens 1..
    token = rollout.input_ids[:, 1:, None]
    mask = rollout.completion_mask[:, 1:].bool()
    log_q, log_pi = q.gather(-1, token).squeeze(-1), pi[:, :-1].gather(-1, token).squeeze(-1)
    torch.testing.assert_close(rollout.sampler_logps[:, 1:][mask], log_q[mask], atol=2e-5, rtol=0)
    first = batches[0]  # GRPO: the one update, rows in order; PPO: its first epoch, every row, shuffled
    mask_b = first["completion_mask"].bool()
    weights, ratio = first["sampler_weights"][mask_b], (log_pi - log_q).exp()[mask]
    if algorithm == "ppo":  # compare as sets of numbers
        weights, ratio = weights.sort().values, ratio.sort().values
    torch.testing.assert_close(weights, ratio, atol=1e-4, rtol=1e-4)
    assert ratio.max() <= 2 + 1e-4 and ratio.min() < 0.9 and ratio.max() > 1.1
    if algorithm == "grpo":
        G = cfg.num_generations
        W = (first["sampler_weights"].sum(-1) / first["completion_mask"].sum(-1)).view(-1, G)
        centred = (W * first["advantages"].view(-1, G)).sum(-1)
        torch.testing.assert_close(centred, torch.zeros_like(centred), atol=1e-5, rtol=0)
    else:
        assert abs(float((first["sampler_weights"] * first["advantages"])[mask_b].sum())) < 1e-4
    record = train_metrics(cfg)[0]
    assert record["guide/alpha"] == 0.5 and record["sampler/weights/max"] <= 2 + 1e-4
    assert 0 < record["guide/frac_tokens_changed"] <= 1 and record["sampler/frac_truncated"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# α = 1, the frozen guide, resume


def same_training(metrics: list[dict]) -> list[dict]:
    """The figures that say what was trained (not timings, not the guide's own)."""
    return [
        {k: v for k, v in m.items() if not k.startswith(("guide/", "time/", "tokens/s"))} for m in metrics
    ]


def test_alpha_one_is_the_unguided_run_bit_for_bit(tmp_path, tiny_model_dir, guide_dir, tokenizer):
    """Three GRPO steps with a KL term, unguided and with a guide at α = 1: the same metrics and the same final
    weights, to the bit (at α = 1 the sampler is the policy's loop, and the trainer's own). The mixture's own
    path at α = 1 draws the unguided loop's very tokens from the same seed (one uniform per row and step)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    plain = grpo_config(tmp_path / "a", tiny_model_dir, data, max_steps=3, beta=0.04)
    grpo.train(plain)
    guided_cfg = guided(grpo_config(tmp_path / "b", tiny_model_dir, data, max_steps=3, beta=0.04), guide_dir)
    grpo.train(guided_cfg)
    ours, theirs = train_metrics(plain), train_metrics(guided_cfg)
    assert same_training(ours) == same_training(theirs)
    assert all(m["guide/alpha"] == 1.0 and m["guide/frac_changed"] == 0.0 for m in theirs)
    a = load_file(f"{plain.output_dir}/final/model.safetensors")
    b = load_file(f"{guided_cfg.output_dir}/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    policy, guide = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(guide_dir))
    prompts = [tokenizer.encode(f"Tom went out {i}. It was") for i in range(3)]
    settings = {"num_samples": 4, "max_new_tokens": 10, "seed": 11, "batch_size": 8}
    ids, logps = sample_ids(policy, tokenizer, prompts, backend="loop", with_logps=True, **settings)
    mixed_ids, mixed_logps, details = guided_sample_ids(
        policy, guide, tokenizer, prompts, alpha=1.0, **settings
    )
    assert mixed_ids == ids and details["tokens_changed"] == [0.0] * 12
    flat = lambda rows: torch.tensor([v for row in rows for v in row])  # noqa: E731
    torch.testing.assert_close(flat(mixed_logps), flat(logps), atol=1e-6, rtol=0)


def test_the_guide_is_frozen_and_an_interrupted_guided_run_resumes_exactly(
    tmp_path, tiny_model_dir, guide_dir, monkeypatch
):
    """A guided GRPO run, α from 0.5 to 1 over 3 of its 4 steps (the last step unguided), with a KL term: the
    same run stopped by Ctrl-C after step 2 and resumed logs the same figures to the bit, α included. The guide
    it loaded is in eval mode without a trainable parameter, its weights equal to guide.model's files after
    every run, and no checkpoint holds it (the policy's tensors only; a resume loads the guide again)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    settings = {"alpha": 0.5, "schedule": "linear", "steps": 3}
    guides = []
    real_load = guided_module.load_guided_sampler

    def load(*args, **kwargs):
        sampler = real_load(*args, **kwargs)
        guides.append(sampler.guide)
        return sampler

    monkeypatch.setattr(grpo, "load_guided_sampler", load)
    whole = guided(
        grpo_config(tmp_path / "a", tiny_model_dir, data, max_steps=4, beta=0.04), guide_dir, **settings
    )
    grpo.train(whole)
    expected = train_metrics(whole)
    assert [m["guide/alpha"] for m in expected] == [0.5, 0.5 + 0.5 / 3, 0.5 + 1 / 3, 1.0]

    cut = guided(
        grpo_config(tmp_path / "b", tiny_model_dir, data, max_steps=4, beta=0.04),
        guide_dir,
        **settings,
    )
    resumed = interrupt_then_resume(grpo.train, cut, monkeypatch, online_loop, "collect", 2)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens/s"))} for m in ms]  # noqa: E731
    assert strip(resumed) == strip(expected)

    files = load_file(str(guide_dir / "model.safetensors"))
    assert len(guides) == 3
    for guide in guides:
        assert not guide.training and not any(p.requires_grad for p in guide.parameters())
        state = guide.state_dict()
        assert all(torch.equal(state[k], files[k]) for k in files)
    checkpoint = sorted((tmp_path / "b" / "out" / "checkpoints").glob("checkpoint-*"))[-1]
    assert sorted(p.name for p in checkpoint.iterdir()) == [  # no guide in it
        "alarms.pt", "model.safetensors", "optimizer.pt", "rewards.pt", "rng.pt", "scheduler.pt", "state.json"
    ]  # fmt: skip
    policy = load_causal_lm(str(tiny_model_dir))  # (saved as the BatchForward around it: "model." + name)
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) == {f"model.{n}" for n, _ in policy.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        ("grpo", ["guide.alpha=0.5"], "guide.alpha=0.5 has no effect without guide.model"),
        ("grpo", ["guide.model=G", "guide.steps=3"], "guide.steps=3 is used by guide.schedule=linear only"),
        ("grpo", ["guide.model=G", "guide.schedule=linear"], "no effect at guide.alpha=1"),
        ("grpo", ["guide.model=G", "guide.alpha=0"], r"'guide.alpha' must be in \(0, 1\]"),
        ("grpo", ["guide.model=G", "generation.backend=vllm"], "only the loop sampler does"),
        ("ppo", ["guide.model=G", "generation.backend=hf"], "only the loop sampler does"),
        (
            "grpo",
            ["guide.model=G", "guide.alpha=0.25"],
            r"sampler_correction_cap=3 is below 1/guide.alpha = 4",
        ),
        (
            "grpo",
            [
                "guide.model=G",
                "guide.alpha=0.5",
                "sampler_correction=token_mask",
                "sampler_correction_cap=1.5",
            ],
            "would mask exactly the tokens the policy favours",
        ),
        (
            "grpo",
            ["guide.model=G", "guide.alpha=0.5", "sampler_correction=sequence_mask"],
            "one weight per completion",
        ),
        ("ppo", ["guide.model=G", "guide.mode=traces"], "PPO samples one completion per prompt"),
    ],
)
def test_settings_a_guide_cannot_run_with_are_refused(command, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOConfig if command == "grpo" else PPOConfig, None, overrides)


def test_a_guide_is_refused_at_run_start_with_another_tokenizer_or_one_the_loop_cannot_drive(
    tmp_path, tiny_model_dir, tiny_t5_dir
):
    """A guide whose tokenizer gives one token another id (the same 2,048 tokens) is refused naming both models;
    an encoder-decoder guide, which the lean loop cannot step beside the policy, too, before any weights load."""
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]  # two tokens swap their ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    cfg = guided(grpo_config(tmp_path / "a", tiny_model_dir, data, max_steps=1), other, alpha=0.5)
    policy_name = re.escape(str(tiny_model_dir))
    message = (
        rf"guide.model .*other does not share the policy's tokenizer \({policy_name}\): .* is id 10[01] in"
    )
    with pytest.raises(ConfigError, match=message):
        grpo.train(cfg)
    cfg = guided(grpo_config(tmp_path / "b", tiny_model_dir, data, max_steps=1), tiny_t5_dir, alpha=0.5)
    with pytest.raises(ConfigError, match="cannot drive guide.model: .* is an encoder-decoder"):
        grpo.train(cfg)


# ---------------------------------------------------------------------------------------------------------------
# What a guide is for


def e_per_completion(model_dir, tokenizer) -> float:
    """The mean number of 'e's in 128 completions (16 prompts x 8, seed 123) of the policy alone."""
    prompts = [tokenizer.encode(f"Tom went out {i}. It was") for i in range(16)]
    ids = sample_ids(
        load_causal_lm(str(model_dir)), tokenizer, prompts, num_samples=8, max_new_tokens=8, seed=123
    )
    return sum(text.count("e") for text in tokenizer.batch_decode(ids, skip_special_tokens=True)) / len(ids)


def test_a_guide_that_knows_the_reward_speeds_a_tiny_policy_up(
    tmp_path, tiny_model_dir, guide_dir, tokenizer
):
    """15 GRPO steps on the letter count (16 completions a step) from the same random policy and seed, unguided
    and guided by the 'e' guide at a constant α = 0.5; then the policy alone writes 128 completions. Measured
    on 2 AMD EPYC cores (torch 2.13, CPU), 'e's per completion after the 15 steps, guided vs unguided, seeds
    1 to 6: 5.6 vs 4.7, 5.8 vs 4.5, 7.5 vs 5.1, 7.3 vs 5.9, 5.4 vs 4.6, 12.4 vs 4.8 (a random policy writes 4.0;
    the guide alone 10.2): the guided policy ahead by +0.8 to +7.7. Seed 3 (+2.4) must keep +1.0 of it.

    The margin needs the baseline correction (`losses.off_policy.importance_weighted_means`): with the groups'
    plain mean reward as the baseline (the mixture's, which the guide raises) the guided policy came out
    behind, 3.1 to 4.5 'e's per completion at a guide of boost 1 for seeds 1 to 3 against 4.5 to 5.1
    unguided, below the 4.0 it started from."""
    data = write_prompts(tmp_path / "prompts.jsonl")
    settings = {"max_steps": 15, "lr": 3e-2, "seed": 3}
    plain = grpo_config(tmp_path / "a", tiny_model_dir, data, **settings)
    grpo.train(plain)
    with_guide = guided(grpo_config(tmp_path / "b", tiny_model_dir, data, **settings), guide_dir, alpha=0.5)
    grpo.train(with_guide)
    unguided = e_per_completion(f"{plain.output_dir}/final", tokenizer)
    guided_ = e_per_completion(f"{with_guide.output_dir}/final", tokenizer)
    assert guided_ > unguided + 1.0, (guided_, unguided)
