"""Loading models and tokenizers (policy, reference, VLM) from a hub name or a local folder, checking sources,
the batch-function wrapper every loss calls, and saving the final model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.io import follow_umask
from alignkit.logprobs.completion import completion_logps, seq2seq_completion_logps
from alignkit.models.compat import enable_activation_checkpointing


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


# Keyed by alignkit.config.base.DTYPE_NAMES, what a `dtype` setting accepts (tests/test_config.py checks).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def local_folder(name_or_path: str) -> Path | None:
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
    path = local_folder(name_or_path)
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
    path = local_folder(name_or_path)
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


def vocabulary_difference(ours: dict, theirs: dict, names: tuple[str, str]) -> str | None:
    """How two tokenizers' token -> id maps (`get_vocab()`) differ, or None when they are the same: their sizes,
    a token only in the second, a token whose id differs; `names` say whose each is ("the student's", ...)."""
    if ours == theirs:
        return None
    only = sorted(set(theirs) - set(ours))
    moved = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    what = f"tokenizer vocabularies differ ({len(ours)} vs {len(theirs)} tokens"
    if only:
        what += f"; {len(only)} only in {names[1]}, e.g. {only[0]!r}"
    if moved:
        what += f"; {moved[0]!r} is id {ours[moved[0]]} in {names[0]}, {theirs[moved[0]]} in {names[1]}"
    return what + ")"


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    *,
    gradient_checkpointing: bool = False,
    pad_token_id: int | None = None,
    encoder_decoder_ok: bool = False,
    device=None,
    check_logps: bool = True,
):
    """A causal LM from a hub name or local directory, safetensors weights only; with `encoder_decoder_ok`
    (algorithms that support them, e.g. PPO) an encoder-decoder LM (AutoModelForSeq2SeqLM: T5, BART, ...)
    when the checkpoint is one; a vision-language model (AutoModelForImageTextToText: LLaVA, Qwen2-VL, ...)
    when it is one; a folder holding a saved LoRA adapter alone, as its base model with the adapter merged
    in (`adapter_base`). The pad id is written into the config when it has none. On `device` when given.

    check_logps: refuse a model whose log-probs alignkit would compute wrongly (a family whose forward
    transforms its logits in a way alignkit does not know: `alignkit.models.load.check_logps_match_forward`,
    two forwards of 8 tokens on `device`). Off only where the model just generates text."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    from alignkit.models.vision import is_vision_language

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    base = adapter_base(name_or_path)
    if base is not None:  # a saved LoRA adapter (lora.merge=false): its base with the adapter merged in
        from peft import PeftModel

        model = load_causal_lm(
            base,
            dtype,
            attn_implementation,
            trust_remote_code,
            encoder_decoder_ok=encoder_decoder_ok,
            check_logps=False,
        )
        model = PeftModel.from_pretrained(model, name_or_path).merge_and_unload()
    else:
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
        check_logps_match_forward(model)
    return model


def adapter_base(name_or_path: str) -> str | None:
    """The base model of a folder that holds a saved LoRA adapter alone (adapter_config.json and no
    config.json: what a run with lora.enabled=true and lora.merge=false saves), else None."""
    import json

    path = local_folder(name_or_path)
    if path is None or (path / "config.json").is_file() or not (path / "adapter_config.json").is_file():
        return None
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{path / 'adapter_config.json'}: no base_model_name_or_path to load the adapter onto"
        )
    return base


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
        gradient_checkpointing=cfg.gradient_checkpointing,
        pad_token_id=pad_token_id,
        encoder_decoder_ok=encoder_decoder_ok,
        device=device,
    )
    return model


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
    model, tokenizer, path: str | Path, merge_lora: bool = False, *, state_dict: dict | None = None
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


def is_pooled_reward_model(name_or_path: str) -> bool:
    """Whether a local folder holds a `PooledRewardModel` (`alignkit reward` with a pooling its backbone's
    stock classifier does not do; alignkit/models/modeling_reward.py)."""
    import json

    path = local_folder(name_or_path)
    if path is None or not (path / "config.json").is_file():
        return False
    return json.loads((path / "config.json").read_text()).get("model_type") == "alignkit_pooled_reward"


def tokenizer_kwargs(name_or_path: str) -> dict:
    """Extra AutoTokenizer.from_pretrained arguments for a folder: a `PooledRewardModel`'s config (which
    AutoTokenizer would otherwise try to load as remote code, asking whether to trust it); else {}."""
    if not is_pooled_reward_model(name_or_path):
        return {}
    from alignkit.models.modeling_reward import PooledRewardConfig

    return {"config": PooledRewardConfig.from_pretrained(name_or_path)}


def _probe_ids(config, length: int) -> torch.Tensor:
    """(length,) distinct token ids of the (text) vocabulary, seeded, none of them a token the config
    names (BOS, EOS, pad, a VLM's image token: a forward without an image refuses those)."""
    text = config.get_text_config(decoder=True)
    special = set()
    for source in (config, text):
        for key, value in source.to_dict().items():
            if key.endswith(("_token_id", "_token_index", "_token_ids")):
                special.update(value if isinstance(value, list) else [value])
    order = torch.randperm(text.vocab_size, generator=torch.Generator().manual_seed(0))
    return torch.tensor([i for i in order.tolist() if i not in special][:length])


def check_logps_match_forward(model: torch.nn.Module, *, length: int = 8) -> None:
    """Refuse a model whose log-probs, as alignkit computes them (backbone, then the head and
    `logit_transform` at the scored positions only), differ from log_softmax of the logits its own forward
    returns, on one row of `length` probe tokens: a family that transforms its logits in a way alignkit
    does not know fails here, naming its model type, instead of training on wrong numbers. Causal LMs,
    VLMs (text only) and encoder-decoders (the probe as source and decoder input).

    Costs two forwards of `length` tokens without gradients, in eval mode (dropout off; the model's mode is
    restored); `alignkit.models.load.load_causal_lm` runs it once on each model it loads, on the device the
    model will run on."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    parameter = next(inner.parameters())
    ids = _probe_ids(config, length)[None].to(parameter.device)  # (1, L)
    mask = torch.ones_like(ids)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            if encoder_decoder:
                batch = {"encoder_input_ids": ids, "encoder_attention_mask": mask, "input_ids": ids}
                batch |= {"attention_mask": mask, "completion_mask": mask}
                ours = seq2seq_completion_logps(model, batch).token_logps[0, 1:]  # (L-1,)
                logits = model(
                    input_ids=ids, attention_mask=mask, decoder_input_ids=ids, use_cache=False
                ).logits
            else:
                ours = completion_logps(model, ids, mask, mask).token_logps[0, 1:]  # (L-1,)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (1, L, V)
    finally:
        inner.train(was_training)
    own = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]  # (L-1,)
    gap = (ours - own).abs().max().item()
    # Rounding: the model's forward applies its softcap / scale in its own dtype where alignkit upcasts the
    # head's output first, so the two may differ by an ulp or two of the largest logit: 2 ulps of bf16 at
    # |z| = 27 are 0.42 nats, of float32 6e-6. Measured on tiny bf16 models whose raw logits reach 45: 0.12
    # nats on a Gemma 2 (softcap 30; a fixed 0.1 would refuse it), 0 on Granite (1/16) and Cohere (1/16);
    # under 2e-6 in float32. The same models with their transform missed: 17, 513 and 724 nats.
    eps = max(torch.finfo(parameter.dtype).eps, torch.finfo(logits.dtype).eps)
    tolerance = 1e-3 + 2 * eps * logits.float().abs().max().item()
    if not gap <= tolerance:  # NaN too
        raise ValueError(
            f"alignkit's log-probs for model type '{config.model_type}' ({type(inner).__name__}) differ from "
            f"log_softmax of the model's own logits by up to {gap:.3g} nats on {length - 1} probe tokens "
            f"(tolerance {tolerance:.3g}): its forward transforms the output head's logits in a way alignkit "
            "does not apply (alignkit.logprobs.transforms.logit_transform knows the logit scales and "
            "softcaps of the Gemma, Granite, Cohere, Falcon-H1, MiniCPM3 and HyperCLOVA X families). Training "
            "or scoring with it would use wrong log-probs; report the model type to alignkit so that its "
            "transform is added."
        )
