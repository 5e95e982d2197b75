"""A reward model that pools its backbone's token states as the backbone was trained: a linear head on the
mean of the token states (sentence-transformers encoders such as all-MiniLM-L6-v2), the first token's or
the last real token's state, on any Hugging Face backbone (`AutoModel`).

Stock `...ForSequenceClassification` classes fix the pooling per architecture (BERT: its [CLS] pooler;
Llama: the last token), and none reads the mean, so `alignkit reward pooling=mean` saves this class.
This file imports only torch and transformers: `alignkit reward` copies it into the saved folder and
registers it in config.json's `auto_map`, so the model also loads without alignkit:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

(the folder's own copy of this file is the code that runs; read it before trusting it). Without
`trust_remote_code` transformers refuses the folder outright (its model_type is this file's), never
silently loading a stock class with the wrong pooling. docs/reward_models.md shows a way without
remote code (the backbone's own class, the head's two tensors and five lines of pooling).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "cls", "last")


class PooledRewardConfig(PretrainedConfig):
    """The backbone's own config (`backbone_config`) and how its token states are pooled (`pooling`)."""

    model_type = "alignkit_pooled_reward"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(self, backbone_config=None, pooling: str = "mean", **kwargs):
        if isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
        self.backbone_config = backbone_config
        self.pooling = pooling
        super().__init__(**kwargs)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) token states -> (B, H): the mean over real tokens (attention_mask 1), the first real
    token's state (cls) or the last real token's (last); either padding side."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])  # (B, T)
    real = attention_mask.bool()
    if pooling == "cls":
        index = torch.where(real, positions, hidden.shape[1]).amin(1)  # first real token
    else:
        index = torch.where(real, positions, -1).amax(1)  # last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class PooledRewardModel(PreTrainedModel):
    """backbone (AutoModel, pooler removed) -> `pool` -> `score` (a linear head, one output per ensemble
    member); `logits` (B, num_labels) as `...ForSequenceClassification` returns them."""

    config_class = PooledRewardConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: PooledRewardConfig, backbone: torch.nn.Module | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # BERT's [CLS] pooler: unused, so neither trained nor saved
        self.score = torch.nn.Linear(config.backbone_config.hidden_size, config.num_labels)
        self.post_init()

    @classmethod
    def around(cls, backbone: torch.nn.Module, pooling: str, num_labels: int = 1) -> PooledRewardModel:
        """A new model around a loaded backbone module (taken over, not copied; its weights are kept),
        the head initialised N(0, initializer_range)."""
        config = PooledRewardConfig(backbone_config=backbone.config, pooling=pooling, num_labels=num_labels)
        with torch.device("meta"):  # the backbone is replaced by the loaded one just below
            model = cls(config)
        model.backbone = backbone
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None
        param = next(backbone.parameters())
        model.score = model.score.to_empty(device=param.device).to(param.dtype)
        torch.nn.init.normal_(model.score.weight, std=getattr(backbone.config, "initializer_range", 0.02))
        torch.nn.init.zeros_(model.score.bias)
        return model

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs):
        """logits (B, num_labels) of the pooled last hidden states; the kwargs go to the backbone."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if position_ids is not None:
            extra["position_ids"] = position_ids
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs
        ).last_hidden_state  # (B, T, H)
        pooled = pool(hidden, attention_mask, self.config.pooling)  # (B, H)
        return SequenceClassifierOutput(logits=self.score(pooled))


# save_pretrained copies this file beside the weights and writes config.json's auto_map.
PooledRewardConfig.register_for_auto_class()
PooledRewardModel.register_for_auto_class("AutoModelForSequenceClassification")
