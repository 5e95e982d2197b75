"""Reward models: a Bradley–Terry sequence classifier trained on preference pairs.

    alignkit reward model=PATH data=pairs.jsonl output_dir=out eval_fraction=0.1

Reads top to bottom: data -> the classifier's input sequences -> model -> loss -> fit -> save.

The reward of a response is one number from a sequence classifier reading `prompt + response`: a linear
head on the pooling the backbone was trained with (`pooling`, `resolve_pooling`): the last token of a
causal LM, an encoder's [CLS] head (the stock `...ForSequenceClassification`, one label "reward"), or
the mean of the token states for a sentence-transformers encoder such as all-MiniLM-L6-v2
(`alignkit.models.modeling_reward.PooledRewardModel`, saved with its own code). `ensemble=K` trains K heads
on one backbone (labels reward_0 ... reward_{K-1}), each from its own seed and Poisson bootstrap
resample of the pairs; the reward is their mean, their std an uncertainty. Scored through the
classifier reward source:

    {type: classifier, model: out/final, text: "{prompt}{response}", max_length: <max_length>}

Where the time goes, and what is done about it (measured in docs/reward_models.md): chosen and rejected
go through the model in one forward; each step draws pairs of similar length (`group_by_length`), so a
batch is padded to its own length rather than to the longest row of a random draw; the prompt is cut
from the left (`max_prompt_length`), so the response, which is what differs, is always read; dropout
is off (`disable_dropout`): it only adds noise to r_w − r_l, and on a CPU costs as much as the matmuls;
and on a causal backbone the prompt is computed once per pair (`share_prompt`: [prompt|chosen|rejected]
segments whose rejected tokens cannot see the chosen ones, exact because a causal prompt never sees
what follows it).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from alignkit.config.base import TrainConfig
from alignkit.config.load import ConfigError
from alignkit.config.supervised import RewardConfig
from alignkit.data.collate import additive_mask, collate_pairs, collate_pairs_shared_prompt
from alignkit.data.prepare import prepare_preference_data
from alignkit.losses.reward import bradley_terry_loss
from alignkit.models.load import BatchForward, disable_dropout, load_tokenizer, sliding_window
from alignkit.models.lora import add_lora
from alignkit.models.reward import is_encoder, load_reward_model
from alignkit.training.loop import fit
from alignkit.training.setup import save_final, start_run
from alignkit.training.step import evaluate_in_batches

ST_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}


def sentence_transformers_pooling(model_path: str) -> str | None:
    """The pooling a sentence-transformers folder was trained with: modules.json names its Pooling module,
    whose config.json sets one pooling_mode_* flag (mean_tokens -> mean, cls_token -> cls, lasttoken ->
    last). None for anything else (a plain transformers folder, a hub name)."""
    path = Path(model_path)
    if not (path / "modules.json").is_file():
        return None
    modules = json.loads((path / "modules.json").read_text())
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if not pooling:
        return None
    config_file = path / pooling[0].get("path", "") / "config.json"
    modes = json.loads(config_file.read_text())
    on = sorted(k for k, v in modes.items() if k.startswith("pooling_mode") and v is True)
    if len(on) != 1 or on[0] not in ST_POOLING_MODES:
        raise ConfigError(
            f"{config_file}: pooling {' + '.join(on) or 'none'} is not one alignkit reward reproduces "
            "(mean, CLS or last token, alone); set pooling=mean, cls or last"
        )
    return ST_POOLING_MODES[on[0]]


def resolve_pooling(pooling: str, model_path: str, encoder: bool) -> str:
    """mean, cls or last: `pooling` itself, or for auto the sentence-transformers folder's own pooling,
    else the backbone's stock classifier's (encoder: cls, through its own head; causal: last)."""
    if pooling != "auto":
        return pooling
    return sentence_transformers_pooling(model_path) or native_pooling(encoder)


def native_pooling(encoder: bool) -> str:
    """The pooling of the stock `...ForSequenceClassification`: [CLS] for encoders (BERT: through its
    pooler), the last real token for causal LMs."""
    return "cls" if encoder else "last"


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single text: ([CLS], [SEP]) for BERT,
    ([BOS], []) for Llama-style tokenizers, ([], []) for GPT-2."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def classifier_pairs(
    examples: list[dict], tokenizer, max_length: int, max_prompt_length: int
) -> tuple[list[dict], int]:
    """Tokenised pairs as the classifier reads them: prompt_ids + chosen_ids is exactly what the tokenizer
    gives for the text `prompt + chosen` (its own special tokens, and no EOS it would not add itself), so
    the saved model scores a (prompt, response) the same way in training and in use.

    The prompt keeps its last tokens and the tokenizer's leading special tokens ([CLS] must stay first for
    an encoder's pooled head); a response is cut from the right and keeps the trailing ones. Returns the
    pairs and how many were dropped for having no response token left.
    """
    lead, trail = special_tokens_around(tokenizer)
    eos = tokenizer.eos_token_id
    out, dropped = [], 0
    for e in examples:
        prompt = e["prompt_ids"]
        if lead and prompt[: len(lead)] == lead:
            prompt = prompt[len(lead) :]
        prompt = prompt[max(len(prompt) - (max_prompt_length - len(lead)), 0) :]
        room = max_length - len(lead) - len(prompt) - len(trail)
        completions = []
        for c in (e["chosen_ids"], e["rejected_ids"]):
            if trail and c[-len(trail) :] == trail:
                c = c[: -len(trail)]
            elif not trail and eos is not None and c and c[-1] == eos:
                c = c[:-1]  # the EOS tokenisation appends for generation; the tokenizer alone does not
            completions.append(c[: max(room, 0)])
        if not all(completions):
            dropped += 1
            continue
        chosen, rejected = completions
        out.append(
            {**e, "prompt_ids": lead + prompt, "chosen_ids": chosen + trail, "rejected_ids": rejected + trail}
        )
    return out, dropped


def last_real_tokens(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into (rows x T) of each pair's last chosen and last rejected token in a prompt-shared
    batch (`segment` maps completion tokens to their pair; rows may hold several pairs), each (B,).

    A Hugging Face decoder classifier reads the last token that is not the pad id (a tokenizer whose
    pad is its EOS appends one it then skips), so that token is the one read here.
    """
    segment = batch["segment"]  # (R, T)
    B = batch["preference"].shape[0]
    flat = torch.arange(segment.numel()).view_as(segment)  # (R, T)
    real = batch["input_ids"] != pad_id
    ends = []
    for mask in (batch["chosen_mask"].bool(), batch["rejected_mask"].bool()):
        last = []
        for keep in (mask & real, mask):  # a response of nothing but pad ids: its last token
            last.append(torch.full((B,), -1).scatter_reduce(0, segment[keep], flat[keep], "amax"))
        ends.append(torch.where(last[0] >= 0, last[0], last[1]))
    return ends[0], ends[1]


def make_collate(pad_id: int, share_prompt: bool):
    """Pairs -> one batch: [prompt | chosen | rejected] segments with the flat positions of the two last
    tokens (`share_prompt`), or 2B padded rows, the chosen sequences then the rejected ones; with the
    pairs' `pair_index` (B,) when they have one (training pairs of an ensemble)."""

    def collate(examples: list[dict]) -> dict:
        batch = pairs_batch(examples)
        if "pair_index" in examples[0]:
            batch["pair_index"] = torch.tensor([e["pair_index"] for e in examples])
        return batch

    def pairs_batch(examples: list[dict]) -> dict:
        if not share_prompt:
            batch = collate_pairs(examples, pad_id)
            del batch["completion_mask"]
            return batch
        batch = collate_pairs_shared_prompt(examples, pad_id)
        batch["chosen_end"], batch["rejected_end"] = last_real_tokens(batch, pad_id)
        for key in ("source_index", "segment", "chosen_mask", "rejected_mask"):
            del batch[key]
        return batch

    return collate


def _backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, score head) of a decoder classifier, looking through a peft wrapper (peft puts LoRA
    layers in place and the trainable head copy behind `score`, so both still apply). Runs inside the
    prepared BatchForward's forward, so DDP / FSDP hooks run around it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.score


def pair_rewards(model, batch: dict) -> dict[str, torch.Tensor]:
    """One forward for the whole batch -> {"chosen", "rejected": rewards, each (B,) float32, or (B, K)
    for an ensemble of K heads}; the batch function the prepared reward model runs (`BatchForward`)."""
    if "allowed" in batch:
        backbone, head = _backbone_and_head(model)
        dtype = next(model.parameters()).dtype
        mask = additive_mask(batch["allowed"], dtype)  # (R, 1, T, T)
        hidden = backbone(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=batch["position_ids"],
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        ends = torch.cat([batch["chosen_end"], batch["rejected_end"]])  # (2B,) flat positions
        rewards = head(hidden.flatten(0, 1)[ends]).float()  # (2B, K)
    else:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if rewards.shape[-1] == 1:
        rewards = rewards.squeeze(-1)  # (2B,)
    B = rewards.shape[0] // 2
    return {"chosen": rewards[:B], "rejected": rewards[B:]}


def reward_loss(
    model, batch: dict, *, center_rewards_coefficient: float = 0.0, bootstrap: torch.Tensor | None = None
):
    """Bradley–Terry loss of the prepared reward model on a batch -> (mean loss over pairs, metrics).

    An ensemble's rewards are (B, K): each head has its own BT loss, weighted per pair by
    `bootstrap[pair_index]` (N, K) when the batch has pair indices (training: head k fits its own
    Poisson(1) resample of the pairs, bagging), and the loss is their mean over heads. The metrics are
    the members' mean reward's (what the classifier source returns), plus `rewards/member_accuracies`
    and `rewards/uncertainty`, the mean over responses of the members' standard deviation.
    """
    rewards = model(batch)
    chosen, rejected = rewards["chosen"], rewards["rejected"]  # (B,) or (B, K)
    members = chosen.dim() == 2

    def per_pair(x: torch.Tensor | None) -> torch.Tensor | None:  # (B,) -> (B, 1) beside (B, K) rewards
        return x[:, None] if x is not None and members else x

    out = bradley_terry_loss(
        chosen,
        rejected,
        margin=per_pair(batch.get("margin")),
        preference=per_pair(batch["preference"]),
        center_rewards_coefficient=center_rewards_coefficient,
    )
    losses, extra = out.losses, {}  # (B,) or (B, K)
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    if members:
        if bootstrap is not None and "pair_index" in batch:
            losses = losses * bootstrap.to(losses.device)[batch["pair_index"]]  # (B, K)
        losses = losses.mean(-1)
        extra = {
            "rewards/member_accuracies": (chosen > rejected).float().mean(),
            "rewards/uncertainty": torch.cat([chosen, rejected]).std(-1, correction=0).mean(),
        }
        chosen, rejected = chosen.mean(-1), rejected.mean(-1)  # (B,): the ensemble's reward
    margins = chosen - rejected
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/accuracies": (margins > 0).float().mean(),
        "rewards/margins": margins.mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        **extra,
        **out.metrics,
    }
    return losses.mean(), metrics


def bootstrap_weights(n: int, members: int, seed: int) -> torch.Tensor | None:
    """(n, members) Poisson(1) counts: how often each member's resample holds each training pair (an
    ensemble member sees about 63% of the pairs, some twice); None for a single model."""
    if members == 1:
        return None
    return torch.poisson(torch.ones(n, members), generator=torch.Generator().manual_seed(seed))


def seed_members(model, members: int, seed: int) -> torch.nn.Linear:
    """Re-draw each ensemble member's row of the output head from its own seed (seed + k), N(0, the
    config's initializer_range), bias 0; returns the head (the last Linear with `members` outputs)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == members]
    if not heads:
        raise TypeError(f"{type(model).__name__} has no linear head with {members} outputs")
    head = heads[-1]
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for k in range(members):
            g = torch.Generator().manual_seed(seed + k)
            head.weight[k] = torch.randn(head.in_features, generator=g).to(head.weight) * std
        if head.bias is not None:
            head.bias.zero_()
    return head


def check_settings(cfg: RewardConfig, encoder: bool, pooling: str) -> bool:
    """Validate the settings for this backbone and pooling; returns whether the prompt is shared."""
    # backbone and center_rewards_coefficient are range-checked when the config loads (RewardConfig.ranges).
    if cfg.group_by_length and not cfg.shuffle:
        raise ConfigError("group_by_length reorders the rows; set shuffle=true or group_by_length=false")
    if cfg.logprob_chunk_size != TrainConfig.logprob_chunk_size:
        raise ConfigError("logprob_chunk_size is not used by a reward model (no log-probs); remove it")
    if cfg.disable_dropout and cfg.lora.enabled and cfg.lora.dropout != RewardConfig().lora.dropout:
        raise ConfigError(
            f"lora.dropout={cfg.lora.dropout} has no effect with disable_dropout=true (every dropout is "
            "off); set disable_dropout=false to use it"
        )
    flash = "flash" in (cfg.attn_implementation or "")
    if encoder and cfg.share_prompt:
        raise ConfigError(
            "share_prompt needs a causal backbone; an encoder's prompt states depend on the response, "
            "so each response is read with its own copy of the prompt; remove share_prompt"
        )
    if cfg.share_prompt and pooling != "last":
        raise ConfigError(
            f"share_prompt reads each response's last token; pooling={pooling} reads others; "
            "remove share_prompt or set pooling=last"
        )
    if cfg.share_prompt and flash:
        raise ConfigError(
            "share_prompt needs a 4D attention mask, which flash attention does not take; "
            "set share_prompt=false or attn_implementation=sdpa"
        )
    if cfg.share_prompt is None:
        return not encoder and not flash and pooling == "last"
    return cfg.share_prompt


def train(cfg: RewardConfig) -> Path:
    """Train a Bradley–Terry reward model on preference pairs; returns the folder of the saved classifier."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    encoder = cfg.backbone == "encoder" or (cfg.backbone == "auto" and is_encoder(model_config))
    pooling = resolve_pooling(cfg.pooling, cfg.model, encoder)
    share_prompt = check_settings(cfg, encoder, pooling)
    window = sliding_window(model_config)  # the one-row layout's 4D mask would override a sliding window
    windowed = share_prompt and window is not None and window < cfg.max_length
    share_prompt = share_prompt and not windowed
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions and cfg.max_length > positions:
        raise ConfigError(f"max_length {cfg.max_length} is more than the model's {positions} positions")
    accelerator, log, output_dir = start_run(cfg)

    # Data: the DPO rows and tokenisation, then each pair as the classifier's two input sequences.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, eval_examples = prepare_preference_data(cfg, tokenizer, log)
    train_examples, dropped = classifier_pairs(
        train_examples, tokenizer, cfg.max_length, cfg.max_prompt_length
    )
    eval_examples, eval_dropped = classifier_pairs(
        eval_examples, tokenizer, cfg.max_length, cfg.max_prompt_length
    )
    if dropped or eval_dropped:
        log(f"{dropped} train and {eval_dropped} eval pairs dropped: no response token fits in max_length")
    if not train_examples:
        raise ValueError(f"{cfg.data}: no training pairs left; raise max_length or lower max_prompt_length")

    def length(e: dict) -> int:  # the row length a pair pads to
        c, r = len(e["chosen_ids"]), len(e["rejected_ids"])
        return len(e["prompt_ids"]) + (c + r if share_prompt else max(c, r))

    model = load_reward_model(
        cfg.model,
        cfg.dtype,
        cfg.attn_implementation,
        cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing,
        pad_token_id=tokenizer.pad_token_id,
        from_causal_lm=not encoder,
        pooling=None if pooling == native_pooling(encoder) else pooling,
        num_labels=cfg.ensemble,
    ).to(accelerator.device)
    if cfg.ensemble > 1:
        seed_members(model, cfg.ensemble, cfg.seed)
        for i, e in enumerate(train_examples):
            e["pair_index"] = i
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora, task_type="SEQ_CLS")
    if cfg.disable_dropout:
        disable_dropout(model)  # the adapter's too
    model.train()
    log(
        f"reward model: {'encoder' if encoder else 'causal LM + value head'} {type(model).__name__}, "
        f"pooling {pooling}, {cfg.ensemble} head(s), "
        f"prompt {'shared' if share_prompt else 'read with each response'}"
        + (f" (its sliding window of {window} tokens is shorter than max_length)" if windowed else "")
    )

    collate = make_collate(tokenizer.pad_token_id, share_prompt)

    loss_fn = partial(
        reward_loss,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        bootstrap=bootstrap_weights(len(train_examples), cfg.ensemble, cfg.seed),
    )
    eval_order = sorted(eval_examples, key=length)  # similar lengths batched together; order-free metrics

    def evaluate(prepared) -> dict:
        return evaluate_in_batches(
            prepared, eval_order, cfg.batch_size, collate, loss_fn=loss_fn, device=accelerator.device
        )

    prepared, _ = fit(
        cfg,
        accelerator,
        BatchForward(model, pair_rewards),
        train_examples,
        collate=collate,
        loss_fn=loss_fn,
        evaluate=evaluate if eval_examples else None,
        lengths=[length(e) for e in train_examples] if cfg.group_by_length else None,
    )

    tokenizer.truncation_side = "left"  # over max_length, users' texts lose prompt, not response
    final = save_final(accelerator, prepared, tokenizer, output_dir, merge_lora=cfg.lora.merge, log=log)
    log(
        f"score with the reward model as {{type: classifier, model: {final}, "
        f'text: "{{prompt}}{{response}}", max_length: {cfg.max_length}}}'
    )
    return final
