"""Model families whose forward transforms the output head's logits before the softmax (issue 20, item 5).

alignkit projects only the completion positions to the vocabulary (`alignkit.logprobs`), so it has to apply
what each family's forward applies after its head: Granite divides by `logits_scaling`, HyperCLOVA X
multiplies by it, MiniCPM3 divides the hidden states by it, Cohere multiplies by `logit_scale`, Falcon-H1 by
`lm_head_multiplier`, Gemma 2 / PaliGemma 2 (its text config) / T5Gemma (its decoder config) softcap with
`final_logit_softcapping`, RecurrentGemma with `logits_soft_cap`. Each family is built here as a tiny
random model (hidden 32, 2 layers) with its transform on and strong, and alignkit's log-probs, entropies and
distillation logits must equal those of the model's own `logits`. A model whose forward does something
alignkit does not know is refused when it loads, naming its model type.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from alignkit.logprobs.completion import completion_logps, completion_states, seq2seq_completion_logps
from alignkit.models.load import load_causal_lm

V = 128  # vocabulary
SIZES = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build(config_class, model_class, **fields):
    torch.manual_seed(0)
    return model_class(config_class(**{**SIZES, **fields})).eval()


def paligemma2():
    """PaliGemma 2: a Gemma 2 text model (softcap in the *text* config) behind a SigLIP tower."""
    torch.manual_seed(0)
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=8,
        patch_size=2,
    )
    text = {**SIZES, "model_type": "gemma2", "head_dim": 8, "final_logit_softcapping": 0.5}
    config = tf.PaliGemmaConfig(
        vision_config=vision.to_dict(), text_config=text, image_token_id=V - 1, projection_dim=32
    )
    return tf.PaliGemmaForConditionalGeneration(config).eval()


def recurrent_gemma():
    torch.manual_seed(0)
    config = tf.RecurrentGemmaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        lru_width=32,
        attention_window_size=16,
        block_types=["recurrent", "attention"],
        logits_soft_cap=0.5,
        pad_token_id=0,
    )
    return tf.RecurrentGemmaForCausalLM(config).eval()


# family -> a tiny model with its logit transform on (the field and what its forward does with it)
CAUSAL = {
    # logits / logits_scaling
    "granite": lambda: build(tf.GraniteConfig, tf.GraniteForCausalLM, logits_scaling=0.25),
    "granitemoe": lambda: build(
        tf.GraniteMoeConfig,
        tf.GraniteMoeForCausalLM,
        logits_scaling=0.25,
        num_local_experts=2,
        num_experts_per_tok=1,
    ),
    # logits * logits_scaling
    "hyperclovax": lambda: build(tf.HyperCLOVAXConfig, tf.HyperCLOVAXForCausalLM, logits_scaling=4.0),
    # lm_head(hidden / logits_scaling), logits_scaling = hidden_size / dim_model_base = 4
    "minicpm3": lambda: build(
        tf.MiniCPM3Config,
        tf.MiniCPM3ForCausalLM,
        dim_model_base=8,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
    # logits * logit_scale
    "cohere2": lambda: build(tf.Cohere2Config, tf.Cohere2ForCausalLM, logit_scale=4.0),
    # logits * lm_head_multiplier
    "falcon_h1": lambda: build(
        tf.FalconH1Config,
        tf.FalconH1ForCausalLM,
        lm_head_multiplier=4.0,
        mamba_d_ssm=32,  # its SSM mixer as small as the attention (the defaults make a 1 M-parameter layer)
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_chunk_size=16,
    ),
    # softcap * tanh(logits / softcap), from the config, the text config, or RecurrentGemma's own field
    "gemma2": lambda: build(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=8, final_logit_softcapping=0.5),
    "paligemma2": paligemma2,
    "recurrent_gemma": recurrent_gemma,
}


def probe() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask) of two 10-token rows, the first 3 tokens a prompt."""
    ids = torch.randint(3, V - 1, (2, 10), generator=torch.Generator().manual_seed(1))
    completion = torch.ones_like(ids)
    completion[:, :3] = 0
    return ids, torch.ones_like(ids), completion


def own_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(B, T) log-probs of `targets` and entropies under softmax(logits / τ): the textbook computation on
    the model's own (B, T, V) logits."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, targets[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_logps_entropy_and_logits_equal_the_models_own(family):
    model = CAUSAL[family]()
    ids, mask, completion = probe()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        for temperature in (1.0, 0.7):
            out = completion_logps(
                model, ids, mask, completion, chunk_size=3, temperature=temperature, with_entropy=True
            )
            logps, entropy = own_logps(logits[:, :-1], ids[:, 1:], temperature)  # (B, T-1)
            scored = completion[:, 1:]
            torch.testing.assert_close(out.token_logps[:, 1:], logps * scored, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.token_entropy[:, 1:], entropy * scored, atol=1e-5, rtol=0)
        # what distillation projects: the full next-token logits at the completion positions
        states = completion_states(model, ids, mask, completion)
        expected = logits[:, :-1][completion[:, 1:].bool()].float()  # (N, V)
        torch.testing.assert_close(states.logits(states.hidden), expected, atol=1e-5, rtol=1e-5)
    from alignkit.models.load import check_logps_match_forward

    check_logps_match_forward(model)  # the load-time guard lets it through


def test_t5gemma_decoder_softcap():
    """The seq2seq path: T5Gemma softcaps with its *decoder* config's final_logit_softcapping."""
    torch.manual_seed(0)
    module = {**SIZES, "head_dim": 8, "final_logit_softcapping": 0.5}
    config = tf.T5GemmaConfig(
        encoder=module, decoder=module, vocab_size=V, pad_token_id=0, eos_token_id=2, decoder_start_token_id=1
    )
    model = tf.T5GemmaForConditionalGeneration(config).eval()
    ids, mask, _ = probe()
    decoder = torch.cat([torch.ones(2, 1, dtype=torch.long), ids[:, :6]], 1)  # [start | completion]
    completion = torch.ones_like(decoder)
    completion[:, 0] = 0
    batch = {
        "encoder_input_ids": ids,
        "encoder_attention_mask": mask,
        "input_ids": decoder,
        "attention_mask": torch.ones_like(decoder),
        "completion_mask": completion,
    }
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        for temperature in (1.0, 0.7):
            out = seq2seq_completion_logps(
                model, batch, chunk_size=3, temperature=temperature, with_entropy=True
            )
            logps, entropy = own_logps(logits[:, :-1], decoder[:, 1:], temperature)
            torch.testing.assert_close(out.token_logps[:, 1:], logps, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.token_entropy[:, 1:], entropy, atol=1e-5, rtol=0)
    from alignkit.models.load import check_logps_match_forward

    check_logps_match_forward(model)


def scaled_forward(cls):
    """`cls.forward` with its logits doubled after the head: a family whose transform alignkit does not
    know."""
    forward = cls.forward

    def forward_scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    return forward_scaled


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_an_unknown_logit_transform_is_refused_when_the_model_loads(
    tmp_path, tiny_model_dir, kind, monkeypatch
):
    """load_causal_lm compares alignkit's log-probs with the model's own log_softmax on a few tokens and
    refuses a mismatch, naming the model type; the same model with its own forward loads."""
    from conftest import build_tiny_t5

    path, cls, model_type = (
        (tiny_model_dir, tf.LlamaForCausalLM, "llama")
        if kind == "causal"
        else (build_tiny_t5(tmp_path / "t5"), tf.T5ForConditionalGeneration, "t5")
    )
    load_causal_lm(str(path), encoder_decoder_ok=True)
    monkeypatch.setattr(cls, "forward", scaled_forward(cls))
    with pytest.raises(ValueError, match=rf"model type '{model_type}' \({cls.__name__}\)") as refused:
        load_causal_lm(str(path), encoder_decoder_ok=True)
    assert "nats" in str(refused.value)


def test_the_guard_allows_half_precision_rounding_but_not_a_missed_transform(monkeypatch):
    """A bf16 Gemma 2 whose logits reach its softcap of 30 rounds the cap in bf16 where alignkit computes
    it in float32 (0.12 nats apart, more than a fixed 0.1 would allow): the guard lets it through. The same model with a forward that
    also doubles its logits is refused, in bf16 too."""
    from alignkit.models.load import check_logps_match_forward

    model = build(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=8, final_logit_softcapping=30.0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(60)  # logits up to 45, past the cap, as a trained model's
    model = model.to(torch.bfloat16)
    check_logps_match_forward(model)
    monkeypatch.setattr(tf.Gemma2ForCausalLM, "forward", scaled_forward(tf.Gemma2ForCausalLM))
    with pytest.raises(ValueError, match=r"model type 'gemma2' \(Gemma2ForCausalLM\)"):
        check_logps_match_forward(model)
