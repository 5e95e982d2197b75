"""Loading policy, reference and reward models and tokenizers; LoRA; saving the final model."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from alignkit.io import follow_umask


class BatchForward(torch.nn.Module):
    """A model whose forward is one of alignkit's batch functions: `fn(model, batch, **kwargs)`, e.g.
    `dpo.pair_logps` -> {"chosen": (B,), ...}.

    This is the module accelerate prepares and every loss calls. DistributedDataParallel all-reduces
    gradients only after its own forward has run, and FSDP / DeepSpeed ZeRO-3 gather parameters only in
    theirs; the chunked log-prob computation reaches into the backbone and the output head, so it must
    run inside the wrapper's forward, not around it. `fn` returns a dict of tensors (which DDP and FSDP
    know how to walk). The wrapped model is `.model` (after `accelerator.unwrap_model`).
    """

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: dict, **kwargs) -> dict:
        return self.fn(self.model, batch, **kwargs)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _local(name_or_path: str) -> Path | None:
    """The local folder `name_or_path` names, or None for a hub name ('gpt2', 'org/name')."""
    path = Path(name_or_path).expanduser()
    looks_local = (
        name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    )
    return path if path.exists() or looks_local else None


def check_model_source(name_or_path: str, key: str = "model", *, weights: bool = True) -> None:
    """ValueError, naming `key`, when a local model folder cannot be loaded: it does not exist, is not a
    transformers folder, or (with `weights`) holds only pickle weights, which alignkit does not load (they
    can run code). Hub names pass (transformers reports those)."""
    path = _local(name_or_path)
    if path is None:
        return
    if not path.exists():
        raise ValueError(
            f"{key}: {name_or_path} does not exist (expected a local model folder or a Hugging Face hub "
            "name such as org/name)"
        )
    if not path.is_dir():
        raise ValueError(
            f"{key}: {name_or_path} is a file (expected a model folder, as save_pretrained writes)"
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(
            f"{key}: {name_or_path} has no config.json (expected a folder save_pretrained wrote)"
        )
    if weights and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ValueError(
            f"{key}: {name_or_path} holds {found}; alignkit loads safetensors only (pickle files can run code "
            "when loaded). Convert them once, where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
        )


def check_tokenizer_source(name_or_path: str, key: str = "tokenizer") -> None:
    """ValueError, naming `key`, when a local folder has no tokenizer files (transformers would suggest
    installing sentencepiece, which is not the problem)."""
    path = _local(name_or_path)
    if path is None:
        return
    if not path.is_dir():
        check_model_source(name_or_path, key, weights=False)  # does not exist, or is a file: says which
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{key}: {name_or_path} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); set "
            "tokenizer=PATH to a folder that has them (e.g. the base model's), or save the tokenizer there"
        )


def check_run_sources(cfg) -> None:
    """The model, tokenizer and reference.model folders a training config names can be loaded (see
    `check_model_source`); checked when the run starts, before data or weights are read."""
    if not cfg.model:
        raise ValueError("model is not set: give model=<hub name or local folder>")
    check_model_source(cfg.model, "model")
    check_tokenizer_source(cfg.tokenizer or cfg.model, "tokenizer" if cfg.tokenizer else "model")
    reference = getattr(cfg, "reference", None)
    if reference is not None and reference.model:
        check_model_source(reference.model, "reference.model")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token (the EOS or UNK token when it has none of its own)."""
    from transformers import AutoTokenizer

    check_tokenizer_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, **tokenizer_kwargs(name_or_path)
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no pad, EOS or UNK token to pad with; add one")
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    pad_token_id: int | None = None,
    *,
    encoder_decoder_ok: bool = False,
    device=None,
    check_logps: bool = True,
):
    """A causal LM from a hub name or local directory, safetensors weights only; with `encoder_decoder_ok`
    (algorithms that support them, e.g. PPO) an encoder-decoder LM (AutoModelForSeq2SeqLM: T5, BART, ...)
    when the checkpoint is one; a vision-language model (AutoModelForImageTextToText: LLaVA, Qwen2-VL, ...)
    when it is one. The pad id is written into the config when it has none. On `device` when given.

    check_logps: refuse a model whose log-probs alignkit would compute wrongly (a family whose forward
    transforms its logits in a way alignkit does not know: `alignkit.logprobs.check_logps_match_forward`,
    two forwards of 8 tokens on `device`). Off only where the model just generates text."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    from alignkit.models.vision import is_vision_language

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    seq2seq = encoder_decoder_ok and is_encoder_decoder(name_or_path, trust_remote_code)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    if not seq2seq and is_vision_language(name_or_path, trust_remote_code):
        auto = AutoModelForImageTextToText
    model = auto.from_pretrained(name_or_path, **kwargs)
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = pad_token_id
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    if device is not None:
        model = model.to(device)
    if check_logps:
        from alignkit.logprobs import check_logps_match_forward

        check_logps_match_forward(model)
    return model


def is_encoder_decoder(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint is an encoder-decoder (T5, FLAN-T5, BART, ...) rather than a causal LM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return bool(getattr(config, "is_encoder_decoder", False))


def sliding_window(config) -> int | None:
    """The attention window of a model whose layers (some or all) see only the last `window` tokens
    (Mistral, Gemma 2/3, Qwen2 with use_sliding_window, ...), read from its (text) config; None when every
    layer sees every earlier token."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def shared_prompt_fits(name_or_path: str, max_length: int, trust_remote_code: bool = False) -> int | None:
    """None when a one-row [prompt | chosen | rejected] layout with a 4D mask (`share_prompt`) computes what
    the model computes; else the model's sliding window, which that mask would override: the 4D mask lets
    every token see its whole segment, where the model's own mask hides tokens further back than the window
    (measured on a tiny Mistral with window 4: log-probs off by up to 0.26 nats)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    window = sliding_window(config)
    return window if window is not None and window < max_length else None


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant), whatever the transformers release calls it."""
    # transformers 5 renamed the method and its argument; older releases only have the old names.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


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


def is_pooled_reward_model(name_or_path: str) -> bool:
    """Whether a local folder holds a `PooledRewardModel` (`alignkit reward` with a pooling its backbone's
    stock classifier does not do; alignkit/models/pooled_reward.py)."""
    import json

    path = _local(name_or_path)
    if path is None or not (path / "config.json").is_file():
        return False
    return json.loads((path / "config.json").read_text()).get("model_type") == "alignkit_pooled_reward"


def tokenizer_kwargs(name_or_path: str) -> dict:
    """Extra AutoTokenizer.from_pretrained arguments for a folder: a `PooledRewardModel`'s config (which
    AutoTokenizer would otherwise try to load as remote code, asking whether to trust it); else {}."""
    if not is_pooled_reward_model(name_or_path):
        return {}
    from alignkit.models.pooled_reward import PooledRewardConfig

    return {"config": PooledRewardConfig.from_pretrained(name_or_path)}


def load_sequence_classifier(name_or_path: str, **kwargs):
    """AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs); a `PooledRewardModel`
    folder is loaded with alignkit's own copy of its class (no trust_remote_code needed for it)."""
    from transformers import AutoModelForSequenceClassification

    if is_pooled_reward_model(name_or_path):
        from alignkit.models.pooled_reward import PooledRewardModel

        kwargs.pop("trust_remote_code", None)
        return PooledRewardModel.from_pretrained(name_or_path, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)


def load_reward_model(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    pad_token_id: int | None = None,
    from_causal_lm: bool | None = None,
    *,
    pooling: str | None = None,
    num_labels: int = 1,
):
    """A sequence classifier with `num_labels` outputs (a scalar reward, value model, or an ensemble of
    heads) to train.

    A causal-LM checkpoint becomes the LM's backbone plus a linear head on the last non-pad token
    (`classifier_from_causal_lm`); a sequence-classifier checkpoint (e.g. a saved reward model) or an
    encoder (BERT-like) loads through AutoModelForSequenceClassification(num_labels), the encoder's
    head new. With `pooling` (mean, cls or last) the head reads that pooling of the backbone's states
    instead (`PooledRewardModel.around`, alignkit/models/pooled_reward.py). from_causal_lm: whether `name_or_path` is
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
            from alignkit.models.pooled_reward import PooledRewardModel

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


def load_policy(
    cfg, pad_token_id: int | None, device, *, encoder_decoder_ok: bool = False
) -> torch.nn.Module:
    """The policy a training config names (`model`, `dtype`, `attn_implementation`, `trust_remote_code`,
    `gradient_checkpointing`), on `device`: a causal LM, or with `encoder_decoder_ok` (algorithms that
    support them, e.g. PPO) an encoder-decoder LM when the checkpoint is one."""
    model = load_causal_lm(
        cfg.model,
        cfg.dtype,
        cfg.attn_implementation,
        cfg.trust_remote_code,
        cfg.gradient_checkpointing,
        pad_token_id,
        encoder_decoder_ok=encoder_decoder_ok,
        device=device,
    )
    return model


def add_lora(model, lora, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap `model` with a trainable LoRA adapter (peft) from LoraSettings.

    task_type SEQ_CLS (classifiers: reward and value models) also keeps the new head (`score` or
    `classifier`) fully trainable and saves it with the adapter.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
    )
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(model, name, False):
        model.enable_input_require_grads()
    with warnings.catch_warnings():
        # peft still asks for transformers' deprecated `is_gradient_checkpointing`; nothing for a user to do.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def disable_dropout(model) -> torch.nn.Module:
    """Set every dropout probability to 0 (as TRL does for reward and preference models by default).

    A Bradley–Terry loss compares two forwards: independent dropout masks on chosen and rejected add
    noise to exactly the difference being learned. On a CPU, drawing the masks also costs as much as
    the matmuls of a small encoder, and attention dropout keeps SDPA off its fused kernel.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Attention dropout is often a float handed to the attention kernel, not a Dropout module
        # (Llama's `attention_dropout`), and configs keep the rates that new modules read.
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        for name, value in vars(config).items() if config is not None else ():
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, 0.0)
    return model


def freeze(model) -> torch.nn.Module:
    """Put a model in eval mode with no trainable parameters (a reference or a scorer)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_model(
    model, tokenizer, path: str | Path, merge_lora: bool = False, state_dict: dict | None = None
) -> Path:
    """save_pretrained as safetensors: full weights, or the LoRA adapter (merged into the base if asked).
    `state_dict`: the weights to write when the model's own are sharded (gathered by the caller)."""
    path = Path(path)
    if merge_lora and hasattr(model, "merge_and_unload"):
        if state_dict is not None:
            raise ValueError(
                "lora.merge with sharded weights (FSDP / ZeRO-3) is not supported; save the adapter"
            )
        model = model.merge_and_unload()
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(path)
    follow_umask(path)
    return path


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
                from alignkit.logprobs import encoder_decoder_states

                hidden = encoder_decoder_states(self.backbone, batch)
            else:
                hidden = self.backbone(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).last_hidden_state  # (B, T, H)
        values = self.head(hidden).squeeze(-1).float()  # (B, T)
        return torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)


@contextlib.contextmanager
def only_adapter(module: torch.nn.Module, name: str | None):
    """Run `module`'s LoRA layers with adapter `name` alone active (nothing changes for None).

    peft's own `set_adapter` also turns requires_grad off for every other adapter, which would freeze the
    policy's adapter while the critic runs; this switches only which adapter the layers apply, so both
    adapters train from one backward through the shared base."""
    if name is None:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer._active_adapter = active


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
