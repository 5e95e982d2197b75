"""The critic of PPO: a value head on the policy's backbone (shared, as a LoRA adapter, or a separate model)."""

from __future__ import annotations

import torch

from alignkit.models.load import disable_dropout
from alignkit.models.lora import only_adapter
from alignkit.models.reward import load_reward_model


class ValueModel(torch.nn.Module):
    """A critic: a scalar head on a transformer's hidden states, giving V(s_t) for every token position.

    values[:, t] is read from the hidden state at t - 1, the state in which token t is chosen (the same
    state whose logits give log π(token t)), so per-token values line up with per-token log-probs; a
    causal backbone reads the sequence, an encoder-decoder one reads the decoder states given the source
    (`encoder_input_ids` in the batch). Built from a copy of the policy's backbone with a new head, or from
    a trained reward model's backbone and head (`value_model_from`).
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Linear,
        encoder_decoder: bool,
        adapter: str | None = None,
    ):
        super().__init__()
        self.backbone, self.head, self.encoder_decoder = backbone, head, encoder_decoder
        self.adapter = adapter  # the LoRA adapter it runs with on a base shared with the policy, or None

    def forward(self, batch: dict) -> torch.Tensor:
        """(B, T) values of the batch's sequence positions (0 at position 0, which nothing predicts)."""
        with only_adapter(self.backbone, self.adapter):
            if self.encoder_decoder:
                from alignkit.logprobs.completion import encoder_decoder_states

                hidden = encoder_decoder_states(self.backbone, batch)
            else:
                hidden = self.backbone(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).last_hidden_state  # (B, T, H)
        values = self.head(hidden).squeeze(-1).float()  # (B, T)
        return torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)


def _zero_head(config, device, dtype) -> torch.nn.Linear:
    """A scalar head (hidden -> 1) initialised to zero, so every value starts at 0."""
    head = torch.nn.Linear(_hidden_size(config), 1, device=device, dtype=dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


VALUE_ADAPTER = "value"


def value_adapter_on(policy, lora_config, device) -> ValueModel:
    """The critic as a second LoRA adapter (`VALUE_ADAPTER`) with its own zero head on the policy's own
    frozen base: `policy` is the peft-wrapped policy, which gets the adapter added (trainable, not active
    for the policy's forward). No copy of the base weights is made."""
    import copy

    policy.add_adapter(VALUE_ADAPTER, copy.deepcopy(lora_config))
    for name, p in policy.named_parameters():
        if f".{VALUE_ADAPTER}." in name:
            p.requires_grad_(True)
    inner = policy.get_base_model()
    encoder_decoder = bool(getattr(inner.config, "is_encoder_decoder", False))
    backbone = inner if encoder_decoder else getattr(inner, inner.base_model_prefix)
    head = _zero_head(inner.config, device, inner.dtype)
    return disable_dropout(ValueModel(backbone, head, encoder_decoder, adapter=VALUE_ADAPTER))


def _hidden_size(config) -> int:
    size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if size is None:
        raise TypeError(f"{type(config).__name__} has neither hidden_size nor d_model")
    return int(size)


def value_model_from(policy: torch.nn.Module, source: str, cfg, device) -> ValueModel:
    """The critic for PPO. source "policy": a deep copy of the policy's backbone (its weights as loaded,
    before any adapter) with a new zero-initialised head, so every value starts at 0; any other value
    is a trained reward model (a hub name or folder, e.g. `alignkit reward` output) whose backbone and
    scalar head initialise the critic (InstructGPT's choice), for causal policies."""
    import copy

    encoder_decoder = bool(getattr(policy.config, "is_encoder_decoder", False))
    if source == "policy":
        backbone = copy.deepcopy(policy if encoder_decoder else getattr(policy, policy.base_model_prefix))
        if encoder_decoder:  # the copy's LM head is unused: frozen, so DDP does not wait for its gradient
            lm_head = backbone.get_output_embeddings()
            if lm_head is not None and lm_head.weight is not backbone.get_input_embeddings().weight:
                lm_head.requires_grad_(False)
        head = _zero_head(policy.config, device, policy.dtype)
    else:
        if encoder_decoder:
            raise ValueError(
                f"value_model={source}: a reward-model critic is for causal policies; use value_model=policy "
                "with an encoder-decoder policy"
            )
        rm = load_reward_model(source, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
        head = getattr(rm, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise ValueError(
                f"value_model={source}: not a decoder reward model with a one-output linear `score` head "
                "(as `alignkit reward` saves for causal LMs)"
            )
        backbone = getattr(rm, rm.base_model_prefix)
    return disable_dropout(ValueModel(backbone, head, encoder_decoder)).to(device)
