"""Reward models: sequence classifiers (a causal LM's backbone with a score head, an encoder, or a saved alignkit
pooled reward model), loaded to train or to score.
"""

from __future__ import annotations

import torch

from alignkit.models.compat import enable_activation_checkpointing
from alignkit.models.load import DTYPES, is_pooled_reward_model, load_causal_lm


def is_encoder(config) -> bool:
    """True for encoder (masked-LM) architectures (BERT, RoBERTa, DeBERTa, ModernBERT, ...); False for
    decoder-only causal LMs (Llama, Qwen, GPT-2, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def classifier_from_causal_lm(lm, num_labels: int = 1):
    """A `...ForSequenceClassification` (a linear `score` head on the last non-pad token) around a loaded
    causal LM's own backbone module (which it takes over, with the LM's config): no copy of the weights,
    and none of them re-read from disk.

    Loading a causal-LM checkpoint with AutoModelForSequenceClassification.from_pretrained instead is
    wrong for tied-embedding checkpoints that store the shared matrix only as `lm_head.weight` (e.g.
    TinyStories-656K): the classifier has no lm_head, so its input embedding is silently left random.
    Saved with save_pretrained, the result stores the embedding under the backbone's own name and loads
    back with AutoModelForSequenceClassification. The head is initialised N(0, initializer_range).
    """
    from transformers import AutoModelForSequenceClassification

    config = lm.config  # one config object from here on: the backbone's modules hold it too
    config.num_labels = num_labels
    config.architectures = None
    with torch.device("meta"):  # everything but the head is replaced by the LM's modules just below
        model = AutoModelForSequenceClassification.from_config(config, dtype=lm.dtype)
    prefix = model.base_model_prefix
    setattr(model, prefix, getattr(lm, lm.base_model_prefix))
    model.config = config
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear `score` head; not a decoder classifier")
    device = next(getattr(model, prefix).parameters()).device
    model.score = head.to_empty(device=device)
    torch.nn.init.normal_(model.score.weight, std=getattr(config, "initializer_range", 0.02))
    if model.score.bias is not None:
        torch.nn.init.zeros_(model.score.bias)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise TypeError(f"{type(model).__name__}: {left[0]} is outside the backbone and the score head")
    return model


def reward_labels(num_labels: int) -> dict[int, str]:
    """id2label of a reward model: {0: "reward"}, or one label per ensemble member, reward_0 ... reward_{K-1}."""
    return {0: "reward"} if num_labels == 1 else {k: f"reward_{k}" for k in range(num_labels)}


def load_sequence_classifier(name_or_path: str, **kwargs):
    """AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs); a `PooledRewardModel`
    folder is loaded with alignkit's own copy of its class (no trust_remote_code needed for it)."""
    from transformers import AutoModelForSequenceClassification

    if is_pooled_reward_model(name_or_path):
        from alignkit.models.modeling_reward import PooledRewardModel

        kwargs.pop("trust_remote_code", None)
        return PooledRewardModel.from_pretrained(name_or_path, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)


def load_reward_model(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    *,
    gradient_checkpointing: bool = False,
    pad_token_id: int | None = None,
    from_causal_lm: bool | None = None,
    pooling: str | None = None,
    num_labels: int = 1,
):
    """A sequence classifier with `num_labels` outputs (a scalar reward, value model, or an ensemble of
    heads) to train.

    A causal-LM checkpoint becomes the LM's backbone plus a linear head on the last non-pad token
    (`classifier_from_causal_lm`); a sequence-classifier checkpoint (e.g. a saved reward model) or an
    encoder (BERT-like) loads through AutoModelForSequenceClassification(num_labels), the encoder's
    head new. With `pooling` (mean, cls or last) the head reads that pooling of the backbone's states
    instead (`PooledRewardModel.around`, alignkit/models/modeling_reward.py). from_causal_lm: whether `name_or_path` is
    a causal LM (default: unless its architecture is an encoder's). `pad_token_id` is written into the
    config: decoder classifiers find the last real token through it, in training and wherever the saved
    model is used.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if is_pooled_reward_model(name_or_path):  # a saved one, trained on
        model = load_sequence_classifier(name_or_path, num_labels=num_labels, **kwargs)
    else:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if from_causal_lm is None:
            from_causal_lm = not is_encoder(config)
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        lm = None
        if from_causal_lm and not classifier:
            # Only its backbone is kept (under a new head): its logits are never used.
            lm = load_causal_lm(
                name_or_path, dtype, attn_implementation, trust_remote_code, check_logps=False
            )
        if pooling is not None and not classifier:
            from alignkit.models.modeling_reward import PooledRewardModel

            backbone = (
                getattr(lm, lm.base_model_prefix) if lm else AutoModel.from_pretrained(name_or_path, **kwargs)
            )
            model = PooledRewardModel.around(backbone, pooling, num_labels)
        elif lm is not None:
            model = classifier_from_causal_lm(lm, num_labels=num_labels)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=num_labels, **kwargs
            )
    model.config.id2label = reward_labels(num_labels)
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model
