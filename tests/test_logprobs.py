"""The log-prob primitive against a naive log_softmax + gather, values and gradients."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from alignkit.data.collate import collate_pairs, pad_sequences
from alignkit.logprobs import completion_logps


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

    from alignkit.logprobs import seq2seq_completion_logps

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
