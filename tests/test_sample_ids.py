"""generation.sample_ids, the sampler of online RL: its lean decode loop against transformers' generate
(greedy, left padding, EOS, LoRA), its draws against the model's softmax, seeds, and top-k / top-p."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINYSTORIES
from test_generation_evaluate import ENDING
from test_generation_evaluate import PROMPTS as STORIES

from alignkit.generation.decode_loop import draw_tokens, loop_decoder
from alignkit.generation.sampling import sample_ids
from alignkit.models.load import load_causal_lm

EOS = 2
# Different lengths (so batches are left-padded); the last one makes the model end its story (EOS)
# within a few tokens, so rows stop at different steps and leave the batch early.
PROMPTS = [*STORIES, ENDING]


@pytest.fixture(scope="module")
def model(tokenizer):
    """The shipped TinyStories-656K model (`tokenizer` is conftest's, the same model's)."""
    return load_causal_lm(str(TINYSTORIES), pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def test_draw_tokens_inverts_the_cdf_exactly():
    """With N evenly spaced uniforms u_k = (k + 1/2) / N the inverse-CDF draw gives token i exactly
    #{k : cdf[i-1] <= u_k < cdf[i]} times, i.e. N * p_i rounded up or down: |count_i - N p_i| <= 1. Tokens
    of probability 0 (-inf scores) are never drawn, even at the ends u = 0 and u -> 1."""
    p = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.4, 0.0, 0.25, 0.0])
    scores = p.log().expand(1000, -1)  # log 0 = -inf
    N = 1000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    counts = torch.bincount(draw_tokens(scores, u), minlength=len(p)).double()
    assert (counts - N * p.double()).abs().max() <= 1
    assert counts[p == 0].sum() == 0
    edges = torch.tensor([0.0, 1 - 2**-53, 1 - 2**-24])
    assert draw_tokens(p.log().expand(3, -1), edges).tolist() == [1, 6, 6]


@pytest.mark.parametrize("shipped", [True, False], ids=["shipped model", "tiny random llama"])
def test_greedy_decoding_equals_generate(shipped, model, tokenizer, prompt_ids, tiny_model_dir):
    """Greedy output of the lean loop == transformers' generate, with left padding of four lengths, rows
    ending (EOS) at different steps, and prompts shared by 2 samples each (encoded once) or not."""
    m = model if shipped else load_causal_lm(str(tiny_model_dir), pad_token_id=tokenizer.pad_token_id)
    assert loop_decoder(m) is not None  # the lean loop drives it
    for n, batch_size in [(1, 4), (2, 4), (2, 3)]:
        kwargs = dict(num_samples=n, max_new_tokens=24, temperature=0.0, batch_size=batch_size)
        lean = sample_ids(m, tokenizer, prompt_ids, **kwargs)
        assert lean == sample_ids(m, tokenizer, prompt_ids, **kwargs, backend="loop")  # auto's choice
        assert lean == sample_ids(m, tokenizer, prompt_ids, **kwargs, backend="hf")
    if shipped:  # the ending prompt's rows stopped early: the loop dropped them from the batch
        assert lean[-1][-1] == EOS and len(lean[-1]) < 24 and len(lean[0]) == 24


def test_greedy_decoding_with_a_lora_adapter_equals_generate(tokenizer, prompt_ids, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(str(tiny_model_dir), pad_token_id=tokenizer.pad_token_id)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert loop_decoder(peft) is not None
    kwargs = dict(num_samples=1, max_new_tokens=12, temperature=0.0)
    with_adapter = sample_ids(peft, tokenizer, prompt_ids, **kwargs)
    assert with_adapter == sample_ids(peft, tokenizer, prompt_ids, **kwargs, backend="hf")
    with peft.disable_adapter():  # the adapter is what changed the output
        assert with_adapter != sample_ids(peft, tokenizer, prompt_ids, **kwargs)


def test_a_model_that_prepares_its_own_inputs_goes_through_generate(model, tokenizer, prompt_ids):
    """A class that overrides prepare_inputs_for_generation (recurrent or multimodal models do) is left to
    generate: the same ids as backend='hf' for the same seed; backend='loop', asked for, is an error."""

    class Custom(type(model)):
        def prepare_inputs_for_generation(self, *args, **kwargs):
            return super().prepare_inputs_for_generation(*args, **kwargs)

    custom = Custom(model.config)
    custom.load_state_dict(model.state_dict())
    assert loop_decoder(custom) is None
    kwargs = dict(num_samples=2, max_new_tokens=8, seed=4)
    assert sample_ids(custom, tokenizer, prompt_ids, **kwargs) == sample_ids(
        model, tokenizer, prompt_ids, **kwargs, backend="hf"
    )
    with pytest.raises(ValueError, match="backend='loop' cannot drive Custom"):
        sample_ids(custom, tokenizer, prompt_ids, **kwargs, backend="loop")
    with pytest.raises(ValueError, match="backend must be one of auto, loop, hf"):
        sample_ids(model, tokenizer, prompt_ids, **kwargs, backend="generate")


def test_an_encoder_decoder_samples_the_tempered_truncated_softmax(tokenizer, prompt_ids, tiny_t5_dir):
    """T5 writes a new sequence from its decoder start token, so the decode loop leaves it to generate.
    What generate draws must be the same distribution as the lean loop's: n = 3000 two-token samples of one
    prompt at temperature 1.5 with top_p 0.9 (the tiny T5 is peaked: at 0.7 its likeliest first token holds
    0.73), the first token's frequencies against q = the nucleus of softmax(logits / 1.5) after the start
    token, and the second token's, among the samples that began with the likeliest first token, against the
    nucleus after [start, that token] (generate's KV cache at work). A sampler that ignored the temperature
    or the truncation is many standard errors off."""
    from transformers import AutoModelForSeq2SeqLM

    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    assert loop_decoder(t5) is None
    n, T, top_p = 3000, 1.5, 0.9
    ids = prompt_ids[0]
    draws = sample_ids(
        t5,
        tokenizer,
        [ids],
        num_samples=n,
        max_new_tokens=2,
        temperature=T,
        top_p=top_p,
        seed=3,
        batch_size=n,
    )
    assert all(1 <= len(d) <= 2 for d in draws)

    def nucleus_after(decoder_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = t5(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder_ids])).logits
        return nucleus((logits[0, -1].double() / T).softmax(-1), top_p)

    start = t5.config.decoder_start_token_id
    q = nucleus_after([start])
    first = torch.tensor([d[0] for d in draws])
    assert_frequencies(torch.bincount(first, minlength=len(q)).double(), q)
    top = int(q.argmax())
    seconds = torch.tensor([d[1] for d in draws if d[0] == top and len(d) == 2])
    assert len(seconds) > 0.2 * n  # (the likeliest first token holds ~0.35 of this nucleus)
    q2 = nucleus_after([start, top])
    assert_frequencies(torch.bincount(seconds, minlength=len(q2)).double(), q2)


def test_seeds_reproduce_and_the_callers_rng_is_untouched(model, tokenizer, prompt_ids):
    kwargs = dict(num_samples=3, max_new_tokens=16)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sample_ids(model, tokenizer, prompt_ids, **kwargs, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = sample_ids(model, tokenizer, prompt_ids, **kwargs, seed=5)
    c = sample_ids(model, tokenizer, prompt_ids, **kwargs, seed=6)
    assert a == b
    # 16 tokens from a 2048-word softmax: a repeat across seeds or within a group would be a seeding bug
    # (the ending prompt's rows can legitimately agree on a short ending, so it is left out).
    assert all(x != y for x, y in zip(a[:9], c[:9]))
    assert all(a[3 * i] != a[3 * i + 1] for i in range(3))
    assert len(a) == 12 and all(len(x) == 16 for x in a[:9])


def nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """p restricted to the smallest most-likely set holding top_p of it, renormalised: a token is kept when
    the mass strictly above it is below top_p."""
    sorted_p, order = p.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p
    q = torch.zeros_like(p)
    q[order[keep]] = sorted_p[keep] / sorted_p[keep].sum()
    return q


def assert_frequencies(counts: torch.Tensor, q: torch.Tensor) -> None:
    """counts (V,) of n draws against the distribution q (V,). Each count is Binomial(n, q_i):
    |freq_i - q_i| < 4 sqrt(q_i (1 - q_i) / n) fails with probability 6e-5 per token for a correct sampler
    (the seeds are fixed, so the tests are deterministic); over all tokens with expected count >= 5,
    Pearson's chi-square (df = k - 1) must be below df + 4 sqrt(2 df). Nothing outside q's support."""
    n = float(counts.sum())
    assert counts[q == 0].sum() == 0
    freq = counts / n
    for i in q.topk(min(8, int((q > 0).sum()))).indices.tolist():
        se = math.sqrt(q[i] * (1 - q[i]) / n)
        assert abs(freq[i] - q[i]) < 4 * se, (i, float(freq[i]), float(q[i]))
    expected = n * q
    big = expected >= 5
    chi2 = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    df = int(big.sum()) - 1
    assert df >= 3 and chi2 < df + 4 * math.sqrt(2 * df), (chi2, df)


def test_sampled_frequencies_match_the_tempered_truncated_softmax(model, tokenizer, prompt_ids):
    """First-token frequencies over n = 4000 samples of one prompt, at temperature 0.8 with top_p 0.95,
    against q = softmax(logits / 0.8) restricted to its nucleus (`nucleus`), tested by `assert_frequencies`;
    a sampler that ignored the temperature or the truncation is off by many standard errors."""
    n, T, top_p = 4000, 0.8, 0.95
    ids = prompt_ids[1]
    draws = sample_ids(
        model,
        tokenizer,
        [ids],
        num_samples=n,
        max_new_tokens=1,
        temperature=T,
        top_p=top_p,
        seed=3,
        batch_size=n,
    )
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=2048).double()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    q = nucleus((logits / T).softmax(-1), top_p)
    assert int((q > 0).sum()) > 10  # the nucleus holds more than 10 tokens here
    assert_frequencies(counts, q)


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.5)])
def test_no_token_outside_top_k_or_top_p_is_ever_sampled(model, tokenizer, prompt_ids, top_k, top_p):
    """Every sampled token of every step, checked against the model's own logits recomputed by one full
    forward over prompt + completion (so the KV cache and position ids of the loop are checked too): its
    rank is below top_k, or the probability mass of the tokens more likely than it is below top_p."""
    samples = sample_ids(
        model, tokenizer, prompt_ids, num_samples=4, max_new_tokens=20, top_k=top_k, top_p=top_p, seed=11
    )
    rows = [p for p in prompt_ids for _ in range(4)]
    checked = 0
    for prompt, completion in zip(rows, samples):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0]
        probs = logits[len(prompt) - 1 : -1].double().softmax(-1)  # (len(completion), V)
        chosen = probs[torch.arange(len(completion)), torch.tensor(completion)]  # (len(completion),)
        above = probs > chosen[:, None] * (1 + 1e-6)  # tokens more likely than the sampled one
        if top_k is not None:
            assert (above.sum(-1) < top_k).all()
        else:
            assert ((probs * above).sum(-1) < top_p + 1e-6).all()
        checked += len(completion)
    assert checked > 200


@pytest.mark.parametrize("backend", ["loop", "hf"])
def test_sampler_logps_equal_the_trainers_under_the_sampling_distribution(
    backend, model, tokenizer, prompt_ids
):
    """with_logps: each drawn token's log-prob as the sampler computed it equals the trainer's score of the
    same token (`logprobs.completion_logps` at the same temperature, renormalised over the same top_k /
    top_p set): the sampler and the trainer are the same model here, so their gap is rounding only."""
    from alignkit.logprobs.completion import completion_logps
    from alignkit.rollout import layout

    settings = dict(temperature=0.7, top_k=20, top_p=0.9)
    ids, logps = sample_ids(
        model,
        tokenizer,
        prompt_ids,
        num_samples=2,
        max_new_tokens=12,
        seed=3,
        backend=backend,
        with_logps=True,
        **settings,
    )
    assert [len(x) for x in logps] == [len(x) for x in ids]
    rows = [p for p in prompt_ids for _ in range(2)]
    input_ids, attention_mask, completion_mask = layout(rows, ids, tokenizer.pad_token_id)
    with torch.no_grad():
        out = completion_logps(model, input_ids, attention_mask, completion_mask, **settings)
    trainer = out.token_logps[completion_mask.bool()]
    sampler = torch.tensor([v for row in logps for v in row])
    assert torch.isfinite(sampler).all() and (sampler < 0).any()
    assert torch.allclose(sampler, trainer, atol=1e-4), (sampler - trainer).abs().max()


def test_loop_backend_refuses_a_model_it_cannot_drive(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(
        ValueError, match="backend='loop' cannot drive T5ForConditionalGeneration .*use 'hf' or 'auto'"
    ):
        sample_ids(t5, tokenizer, [[1, 2]], max_new_tokens=2, backend="loop")
