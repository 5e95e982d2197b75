"""The log-prob primitive against a naive log_softmax + gather, values and gradients."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from alignkit.data.collate import collate_pairs, pad_sequences
from alignkit.logprobs.completion import completion_logps


def naive_token_logps(model, input_ids, attention_mask, completion_mask):
    """The textbook computation: full (B, T, V) float32 logits, log_softmax, gather."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
    logps = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    out[:, 1:] = logps * completion_mask[:, 1:]
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def ragged_batch():
    """Rows of different lengths (right padding) with completions of different lengths, one truncated
    to a single completion token."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 2048, (n,), generator=g).tolist() for n in (12, 7, 20, 5)]
    starts = [4, 3, 15, 4]  # the last row has exactly one completion token
    return pad_sequences(rows, starts, pad_id=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_matches_naive_log_softmax(model, chunk_size):
    batch = ragged_batch()
    with torch.no_grad():
        out = completion_logps(model, **batch, chunk_size=chunk_size)
        naive = naive_token_logps(model, **batch)
    torch.testing.assert_close(out.token_logps, naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum, naive.sum(-1), atol=1e-5, rtol=0)
    assert out.count.tolist() == [8, 4, 5, 1]
    # padding and prompt positions carry no log-prob
    assert (out.token_logps[batch["completion_mask"] == 0] == 0).all()


def test_gradients_match_naive(model):
    batch = ragged_batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    model.zero_grad()
    (completion_logps(model, **batch, chunk_size=2).sum * weights).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (naive_token_logps(model, **batch).sum(-1) * weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


def test_concatenated_forward_equals_separate_passes(model):
    examples = [
        {
            "prompt_ids": [1, 50, 60, 70],
            "chosen_ids": [80, 90, 2],
            "rejected_ids": [81, 2],
            "preference": 1.0,
        },
        {
            "prompt_ids": [1, 55],
            "chosen_ids": [85, 95, 105, 115, 2],
            "rejected_ids": [86, 96, 2],
            "preference": 1.0,
        },
    ]
    with torch.no_grad():
        joint = completion_logps(
            model, **{k: v for k, v in collate_pairs(examples, 0).items() if k != "preference"}
        )
        for key, offset in (("chosen_ids", 0), ("rejected_ids", 2)):
            seqs = [e["prompt_ids"] + e[key] for e in examples]
            alone = completion_logps(
                model, **pad_sequences(seqs, [len(e["prompt_ids"]) for e in examples], 0)
            )
            torch.testing.assert_close(joint.sum[offset : offset + 2], alone.sum, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_layout_equals_plain_padded(tiny_model_dir, attn):
    """[prompt | chosen | rejected] segments with a 4D mask, one pair per row or packed several to a row,
    give the plain layout's per-sequence log-probs and gradients, for pairs of different lengths
    (padding) and a one-token rejected completion."""
    from alignkit.algorithms.dpo import pair_logps
    from alignkit.data.collate import collate_pairs_shared_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    g = torch.Generator().manual_seed(7)

    def ids(n):
        return torch.randint(3, 2048, (n,), generator=g).tolist()

    examples = [
        {"prompt_ids": [1] + ids(9), "chosen_ids": ids(4), "rejected_ids": ids(6), "preference": 1.0},
        {"prompt_ids": [1] + ids(3), "chosen_ids": ids(7), "rejected_ids": ids(1), "preference": 1.0},
        {"prompt_ids": [1] + ids(1), "chosen_ids": ids(2), "rejected_ids": ids(3), "preference": 1.0},
    ]
    examples.append(
        {"prompt_ids": [1] + ids(2), "chosen_ids": ids(3), "rejected_ids": ids(2), "preference": 1.0}
    )
    packed = collate_pairs_shared_prompt(examples, 0)
    # segments of 20, 12, 7 and 8 tokens: rows of 20 hold [20], [12, 8], [7]
    assert packed["input_ids"].shape == (3, 20)
    results = []
    for collate in (
        collate_pairs,
        partial(collate_pairs_shared_prompt, pack=False),
        collate_pairs_shared_prompt,
    ):
        model.zero_grad()
        out = pair_logps(model, collate(examples, 0), chunk_size=4)
        c, r, nc, nr = (out[k] for k in ("chosen", "rejected", "n_chosen", "n_rejected"))
        (c.sum() - 2 * r.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((c.detach(), r.detach(), nc, nr, grads))
    plain = results[0]
    for shared in results[1:]:
        for a, b in zip(plain[:4], shared[:4]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert shared[3].tolist() == [6, 1, 3, 2]
        torch.testing.assert_close(plain[4], shared[4], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_temperature_and_entropy_match_naive(model, temperature):
    """Log-probs under softmax(logits / τ) (the distribution a sampler at τ drew from) and the entropy of
    that distribution at every scored position, against the full (B, T, V) computation; gradients too."""
    batch = ragged_batch()
    mask = batch["completion_mask"].clone()
    mask[:, 0] = 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp_all = F.log_softmax(logits[:, :-1] / temperature, dim=-1)  # (B, T-1, V)
    naive = torch.zeros(batch["input_ids"].shape)
    naive[:, 1:] = logp_all.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
    naive_entropy = torch.zeros(batch["input_ids"].shape)
    naive_entropy[:, 1:] = -(logp_all.exp() * logp_all).sum(-1) * mask[:, 1:]

    out = completion_logps(model, **batch, chunk_size=3, temperature=temperature, with_entropy=True)
    torch.testing.assert_close(out.token_logps, naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.token_entropy, naive_entropy, atol=1e-4, rtol=0)
    assert (out.token_entropy[mask == 1] > 0).all()

    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    model.zero_grad()
    ((out.sum * weights).sum() + out.token_entropy.sum()).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ((naive.sum(-1) * weights).sum() + naive_entropy.sum()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        completion_logps(model, **batch, temperature=0.0)


def test_a_ddp_wrapper_is_refused_rather_than_bypassed(model):
    """Reaching past a DDP wrapper to the backbone would skip its gradient all-reduce: an error."""

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match="BatchForward"):
        completion_logps(Wrapper(model), **ragged_batch())


@pytest.mark.parametrize("tie", [False, True])
def test_seq2seq_logps_equal_the_full_forward(tmp_path, tie):
    """Decoder log-probs given the source equal log_softmax of the model's own logits (FLAN-T5's untied
    head and T5's tied, scaled one), at temperature 1 and 0.7, with padding on both sides."""
    from conftest import build_tiny_t5
    from transformers import AutoModelForSeq2SeqLM

    from alignkit.logprobs.completion import seq2seq_completion_logps

    model = AutoModelForSeq2SeqLM.from_pretrained(build_tiny_t5(tmp_path / "t5", tie=tie)).eval()
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(3, 2048, (2, 6), generator=g)
    enc_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(3, 2048, (2, 4), generator=g)], 1)
    dec_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    completion = dec_mask.clone()
    completion[:, 0] = 0  # the decoder start token is not a completion token
    batch = {
        "encoder_input_ids": enc,
        "encoder_attention_mask": enc_mask,
        "input_ids": dec,
        "attention_mask": dec_mask,
        "completion_mask": completion,
    }
    for temperature in (1.0, 0.7):
        out = seq2seq_completion_logps(model, batch, chunk_size=3, temperature=temperature)
        logits = model(
            input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
        ).logits  # (B, T, V)
        naive = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(-1, dec[:, 1:, None])[
            ..., 0
        ]
        expected = torch.cat([torch.zeros(2, 1), naive], 1) * completion
        torch.testing.assert_close(out.token_logps, expected, atol=1e-5, rtol=1e-5)
        assert out.count.tolist() == [4, 2]


# --------------------------------------------------------------------------------------------
# Truncated sampling (top_k / top_p): the policy's log-probs are those of the distribution the sampler
# drew from, softmax(logits / τ) renormalised over the kept set that the same logits define.

TRUNCATIONS = [(20, None), (None, 0.8), (50, 0.5)]


def sampler_scores(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """(N, V) scores a `generate(do_sample=True, ...)` sampler draws from: transformers' own warpers, in the
    order generate applies them (temperature, top-k, top-p); -inf outside the kept set."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.parametrize("top_k, top_p", TRUNCATIONS)
def test_truncated_logps_equal_the_samplers_processed_scores(model, top_k, top_p):
    """Completions drawn by transformers' generate (do_sample, τ = 0.7, top_k / top_p) are scored by
    completion_logps under the same settings: each token's log-prob equals log_softmax of the scores generate
    itself drew it from (`output_scores`: the logits after its warpers), the entropy is that distribution's,
    and the gradients equal the naive (B, T, V) computation's. Untruncated scoring (what training did
    before) is off by over 0.05 nats somewhere in every setting."""
    from alignkit.rollout import layout

    T = 0.7
    prompts = [[1, 50, 60, 70], [1, 55], [1, 9, 8]]
    width = max(map(len, prompts))  # left-padded for generate
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=T,
            top_k=top_k or 0,
            top_p=top_p or 1.0,
            max_new_tokens=8,
            eos_token_id=None,  # (no row stops early: every step's scores belong to every row)
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    completions = out.sequences[:, input_ids.shape[1] :]  # (B, 8)
    scores = torch.stack(out.scores, 1).float()  # (B, 8, V): what each token was drawn from
    sampler = scores.log_softmax(-1).gather(-1, completions[..., None])[..., 0]  # (B, 8)
    ids, attn, mask = layout(prompts, completions.tolist(), 0)
    got = completion_logps(model, ids, attn, mask, chunk_size=5, temperature=T, top_k=top_k, top_p=top_p)
    starts = [len(p) for p in prompts]
    scored = torch.stack([got.token_logps[b, s : s + 8] for b, s in enumerate(starts)])
    torch.testing.assert_close(scored, sampler, atol=1e-4, rtol=0)
    plain = completion_logps(model, ids, attn, mask, temperature=T).token_logps
    assert (torch.stack([plain[b, s : s + 8] for b, s in enumerate(starts)]) - sampler).abs().max() > 0.05

    # Entropy and gradients against the naive computation on the full logits, kept sets from the warpers.
    got = completion_logps(
        model, ids, attn, mask, chunk_size=5, temperature=T, top_k=top_k, top_p=top_p, with_entropy=True
    )
    logits = model(input_ids=ids, attention_mask=attn).logits.float()[:, :-1]  # (B, L, V)
    with torch.no_grad():
        kept = sampler_scores(logits.reshape(-1, logits.shape[-1]), T, top_k, top_p).isfinite()
    z = (logits / T).reshape(-1, logits.shape[-1]).masked_fill(~kept, float("-inf"))
    logp_all = z.log_softmax(-1).view_as(logits)  # (B, L, V)
    naive = torch.zeros(ids.shape)  # (prompt tokens may lie outside the kept sets: -inf there, not scored)
    naive[:, 1:] = logp_all.gather(-1, ids[:, 1:, None])[..., 0].where(mask[:, 1:].bool(), 0.0)
    p_all = logp_all.exp()
    naive_entropy = torch.zeros(ids.shape)
    naive_entropy[:, 1:] = -(p_all * logp_all.masked_fill(p_all == 0, 0)).sum(-1) * mask[:, 1:]
    torch.testing.assert_close(got.token_logps, naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.token_entropy, naive_entropy, atol=1e-4, rtol=0)
    weights = torch.tensor([1.0, -2.0, 0.5])
    model.zero_grad()
    ((got.sum * weights).sum() + got.token_entropy.sum()).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ((naive.sum(-1) * weights).sum() + naive_entropy.sum()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


def test_a_token_outside_the_kept_set_is_scored_in_the_kept_set_plus_itself(model):
    """After an update the policy's own kept set may no longer hold a token it sampled before. Its log-prob
    is then taken over the kept set plus that token: finite, with finite gradients (never -inf, which would
    make the ratio's and the KL's gradients nan), never below the untruncated log-prob, and equal to it
    where the kept set is everything. Random ids under top_k = 5 are almost all outside the kept set."""
    batch = ragged_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["input_ids"][:, 1:]
    with torch.no_grad():
        kept = sampler_scores(logits[:, :-1].reshape(-1, 2048), 1.0, 5, None).isfinite().view(4, -1, 2048)
        kept.scatter_(-1, targets[..., None], True)
    mask = batch["completion_mask"][:, 1:].bool()
    assert (~sampler_scores(logits[:, :-1], 1.0, 5, None).isfinite().gather(-1, targets[..., None]))[
        mask
    ].float().mean() > 0.9
    hand = logits[:, :-1].masked_fill(~kept, float("-inf")).log_softmax(-1).gather(-1, targets[..., None])
    out = completion_logps(model, **batch, chunk_size=3, top_k=5, with_entropy=True)
    torch.testing.assert_close(out.token_logps[:, 1:][mask], hand[..., 0][mask], atol=1e-5, rtol=0)
    plain = completion_logps(model, **batch).token_logps
    assert (out.token_logps >= plain - 1e-6).all()
    model.zero_grad()
    (out.sum.sum() + out.token_entropy.sum()).backward()
    assert all(p.grad.isfinite().all() for p in model.parameters())
    assert out.token_logps.isfinite().all() and out.token_entropy.isfinite().all()
    model.zero_grad()
    with torch.no_grad():  # top_k = V and top_p = 1 keep everything: the untruncated log-probs
        everything = completion_logps(model, **batch, top_k=2048, top_p=1.0).token_logps
    torch.testing.assert_close(everything, plain.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k, top_p", [(4, None), (None, 0.7), (6, 0.8)])
def test_the_policy_gradient_is_the_exact_gradient_of_the_truncated_objective(top_k, top_p):
    """J(θ) = Σ_y q_θ(y) r(y) over every 2-token completion y of one prompt, with q_θ the truncated, tempered
    distribution the sampler draws from (τ = 0.7): q(y1, y2) = q(y1) q(y2 | y1), q(·) = softmax(z / τ)
    renormalised over the kept set (top-k: the k largest; top-p: the tokens whose strictly more likely
    tokens hold less than p), computed here by hand on a tiny Llama with a 16-token vocabulary, so that all
    256 completions are enumerated. The REINFORCE estimator's expectation, Σ_y q(y) r(y) ∇ log q(y) with
    log q(y) from completion_logps(top_k, top_p), must equal ∇J exactly; with the untruncated log-probs
    (the old scoring) it does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,  # peaked enough that top-p keeps a proper subset
        pad_token_id=0,
    )
    policy = LlamaForCausalLM(config).eval()
    T, V = 0.7, 16
    prompt = [1, 5]
    ys = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (256, 2)
    ids = torch.cat([torch.tensor(prompt).expand(len(ys), -1), ys], 1)  # (256, 4)
    reward = torch.randn(len(ys), generator=torch.Generator().manual_seed(1))  # (256,)

    def truncated_logq(z: torch.Tensor) -> torch.Tensor:  # (N, V) tempered logits -> (N, V) log q
        with torch.no_grad():
            probs = z.softmax(-1)
            sorted_p, order = probs.sort(-1, descending=True)
            keep = torch.ones_like(sorted_p, dtype=torch.bool)
            if top_k:
                keep &= torch.arange(V) < top_k
            if top_p:
                renormalised = sorted_p * keep / (sorted_p * keep).sum(-1, keepdim=True)
                keep &= renormalised.cumsum(-1) - renormalised < top_p
            kept = torch.zeros_like(keep).scatter(-1, order, keep)
        return z.masked_fill(~kept, float("-inf")).log_softmax(-1)

    logits = policy(ids).logits.float() / T  # (256, 4, V)
    logq1 = truncated_logq(logits[:, 1]).gather(-1, ys[:, :1])[:, 0]  # (256,)
    logq2 = truncated_logq(logits[:, 2]).gather(-1, ys[:, 1:])[:, 0]
    q = (logq1 + logq2).exp()  # (256,) 0 outside the kept sets
    assert torch.isclose(q.sum(), torch.tensor(1.0)) and 0 < int((q > 0).sum()) < len(ys)
    exact = torch.autograd.grad((q * reward).sum(), list(policy.parameters()))

    drawn = (q > 0).nonzero()[:, 0]  # the completions the sampler can draw
    batch = {
        "input_ids": ids[drawn],
        "attention_mask": torch.ones_like(ids[drawn]),
        "completion_mask": torch.tensor([[0, 0, 1, 1]]).expand(len(drawn), -1),
    }
    weights = (q * reward)[drawn].detach()

    def estimator(**truncation) -> list[torch.Tensor]:
        logps = completion_logps(policy, **batch, chunk_size=7, temperature=T, **truncation).sum  # (n,)
        return torch.autograd.grad((weights * logps).sum(), list(policy.parameters()))

    for e, g in zip(estimator(top_k=top_k, top_p=top_p), exact):
        torch.testing.assert_close(e, g, atol=1e-6, rtol=1e-4)
    biased = estimator()
    assert max(float((e - g).abs().max()) for e, g in zip(biased, exact)) > 1e-3
