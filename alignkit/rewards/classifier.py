"""Trained classifiers as rewards: any Hugging Face sequence classifier, and `alt-profanity-check`.

A sequence classifier maps text to logits over its labels (`config.id2label`); the reward is one
label's logit, or its probability under a softmax over the labels (single-label heads) or a sigmoid
(multi-label heads, where each label is its own yes/no). Which text it sees is a template over
{prompt} and {response}; cross-encoders that take the prompt and response as a pair (e.g. reward
models trained on (question, answer)) get `text: "{prompt}"` and `text_pair: "{response}"`.

A conversational prompt is scored as TRL scores it: the conversation (the prompt's messages, then the
response as the assistant's reply) rendered with the classifier's own chat template and tokenised with
one BOS (`data.tokenize.adds_special_tokens`), not the policy's rendering of it (whose markup and BOS a
reward model re-tokenising the text would read as content). That is the default when the classifier's
tokenizer has a chat template and `text` / `text_pair` are left as they are (`chat_template`).

An ensemble reward model (`alignkit reward ensemble=K`: labels reward_0 ... reward_{K-1}, one per
member) scores with its members' mean, and their standard deviation (population, over the K members)
is its uncertainty: `uncertainty_weight: λ` returns mean − λ·std (a pessimistic reward), `output:
uncertainty` returns the std itself (a cost with `cost_threshold`, a negative-weight term, or a filter),
and each batch's mean std is logged as `<name>/uncertainty`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.config.load import ConfigError
from alignkit.data.chat import render_messages
from alignkit.data.tokenize import adds_special_tokens
from alignkit.models.load import DTYPES, tokenizer_kwargs
from alignkit.models.reward import load_sequence_classifier, reward_labels
from alignkit.rewards.base import (
    Prompt,
    RowMean,
    SourceOptions,
    as_scores,
    check_batch,
    check_template,
    fill,
)


@dataclass
class ClassifierOptions(SourceOptions):
    """A Hugging Face sequence classifier; the reward is one label's logit or probability."""

    model: str = ""
    """Classifier: a Hugging Face hub name or a local directory (safetensors weights only)."""
    tokenizer: str | None = None
    """Tokenizer to load (default: the model's)."""
    label: str | None = None
    """Label whose score is the reward: a name from config.id2label or an index (needed if >1 label)."""
    function_to_apply: str = "none"
    """none (the raw logit), softmax (probability among the labels) or sigmoid (of the logit)."""
    text: str = "{response}"
    """What the classifier reads: a template over {prompt} and {response}."""
    text_pair: str | None = None
    """Second segment for pair classifiers (e.g. text '{prompt}', text_pair '{response}')."""
    chat_template: bool | None = None
    """Conversational prompts: score the conversation (prompt messages + the response as the assistant's
    reply) rendered with the classifier's own chat template (true), or fill `text` with its content
    (false); none = true when the classifier's tokenizer has a chat template and text / text_pair are left
    at their defaults. Text prompts always fill `text`."""
    batch_size: int = 32
    """Texts per forward pass."""
    max_length: int = 512
    """Tokens kept per text (longer texts are truncated)."""
    truncation_side: str | None = None
    """Which end is cut from texts over max_length: left or right (default: the tokenizer's)."""
    device: str = "auto"
    """Where the classifier runs: auto (cuda if available), cpu, cuda, cuda:1, mps, ..."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""
    trust_remote_code: bool = False
    """Allow the model repository to run its own code. Off unless you trust the source."""
    output: str = "reward"
    """reward (the label's score; an ensemble's members' mean) or uncertainty (an ensemble's members' std)."""
    uncertainty_weight: float = 0.0
    """Ensembles, output reward: the score is mean − uncertainty_weight·std (penalises disagreement)."""


def ensemble_members(id2label: dict) -> int:
    """K for an ensemble reward model's labels (reward_0 ... reward_{K-1}, K > 1); 0 for anything else."""
    labels = {int(k): str(v) for k, v in id2label.items()}
    k = len(labels)
    return k if k > 1 and labels == reward_labels(k) else 0


def resolve_label(label: str | None, id2label: dict, where: str = "classifier") -> int:
    """Index of `label` (a name in id2label, else an integer index); the only label when None."""
    names = {str(v): int(k) for k, v in id2label.items()}
    n = len(id2label)
    listing = ", ".join(f"{k}={v}" for k, v in sorted((int(k), v) for k, v in id2label.items()))
    if label is None:
        if n == 1:
            return 0
        raise ConfigError(f"{where}: the classifier has {n} labels ({listing}); set 'label' to one of them")
    if label in names:
        return names[label]
    if label.lstrip("-").isdigit() and 0 <= int(label) < n:
        return int(label)
    raise ConfigError(f"{where}: label {label!r} is not a label of the classifier ({listing})")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ClassifierReward:
    """A label's logit or probability from `AutoModelForSequenceClassification` (see module docstring)."""

    def __init__(self, options: ClassifierOptions):
        from transformers import AutoTokenizer

        self.options, self.name, self.weight = options, options.name, options.weight
        self.device = _device(options.device)
        tokenizer = options.tokenizer or options.model
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer, trust_remote_code=options.trust_remote_code, **tokenizer_kwargs(tokenizer)
        )
        if options.truncation_side:
            self.tokenizer.truncation_side = options.truncation_side
        if self.tokenizer.pad_token_id is None:  # decoder classifiers (Llama, GPT-2) often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = load_sequence_classifier(
            options.model,
            dtype=DTYPES[options.dtype],
            trust_remote_code=options.trust_remote_code,
            use_safetensors=True,
        )
        if self.model.config.pad_token_id is None:
            # Decoder classifiers read the logits at the last non-pad token, found through this id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        where = f"classifier '{self.name}'"
        self.members = 0 if options.label is not None else ensemble_members(self.model.config.id2label)
        self.label = 0 if self.members else resolve_label(options.label, self.model.config.id2label, where)
        if not self.members and (options.output != "reward" or options.uncertainty_weight):
            raise ConfigError(
                f"{where}: output={options.output}, uncertainty_weight={options.uncertainty_weight} need an "
                f"ensemble reward model (alignkit reward ensemble=K, labels reward_0...); {options.model} has "
                f"labels {self.model.config.id2label}{' and label is set' if options.label else ''}"
            )
        if self.members and options.function_to_apply == "softmax":
            raise ConfigError(f"{where}: softmax over ensemble members means nothing; use none or sigmoid")
        self.uncertainty: RowMean | None = None  # the members' mean std on the last batch scored
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if options.chat_template and not has_template:
            raise ConfigError(f"{where}: chat_template=true, but {tokenizer} has no chat template")
        defaults = options.text == ClassifierOptions.text and options.text_pair is None
        self.chat = has_template and defaults if options.chat_template is None else options.chat_template

    @staticmethod
    def check(options: ClassifierOptions, where: str) -> None:
        if not options.model:
            raise ConfigError(f"{where}: 'model' is required (a hub name or a local directory)")
        if options.function_to_apply not in ("none", "softmax", "sigmoid"):
            raise ConfigError(
                f"{where}: function_to_apply '{options.function_to_apply}' is not one of none, softmax, sigmoid"
            )
        if options.truncation_side not in (None, "left", "right"):
            raise ConfigError(f"{where}: truncation_side '{options.truncation_side}' is not left or right")
        if options.output not in ("reward", "uncertainty"):
            raise ConfigError(f"{where}: output '{options.output}' is not reward or uncertainty")
        if options.dtype not in DTYPES:
            raise ConfigError(f"{where}: dtype '{options.dtype}' is not one of {', '.join(DTYPES)}")
        if options.batch_size < 1 or options.max_length < 1:
            raise ConfigError(f"{where}: batch_size and max_length must be >= 1")
        check_template(options.text, "text", where)
        if options.text_pair is not None:
            check_template(options.text_pair, "text_pair", where)

    def _encode(self, prompts: list[Prompt], responses: list[str]) -> dict:
        """The batch as the classifier reads it: conversations in its own chat template (one BOS), text
        prompts through `text` / `text_pair`."""
        o = self.options
        if self.chat and any(isinstance(p, list) for p in prompts):
            rows = []
            for p, r in zip(prompts, responses):
                if isinstance(p, list):
                    reply = {"role": "assistant", "content": r}
                    text = render_messages(self.tokenizer, [*p, reply], add_generation_prompt=False)
                    special = adds_special_tokens(self.tokenizer, text)
                else:
                    text, special = fill(o.text, p, r), True
                rows.append(
                    self.tokenizer(text, truncation=True, max_length=o.max_length, add_special_tokens=special)
                )
            return self.tokenizer.pad(rows, return_tensors="pt")
        texts = [fill(o.text, p, r) for p, r in zip(prompts, responses)]
        pairs = [fill(o.text_pair, p, r) for p, r in zip(prompts, responses)] if o.text_pair else None
        return self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=o.max_length, return_tensors="pt"
        )

    @torch.no_grad()
    def logits(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        """(B, num_labels) float32 logits on the CPU, in batches of `batch_size`."""
        check_batch(prompts, responses)
        size = self.options.batch_size
        out = []
        for start in range(0, len(responses), size):
            enc = self._encode(prompts[start : start + size], responses[start : start + size])
            out.append(self.model(**enc.to(self.device)).logits.float().cpu())  # (b, num_labels)
        if not out:
            return torch.zeros(0, self.model.config.num_labels)
        return torch.cat(out)

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        logits = self.logits(prompts, responses)  # (B, L)
        if self.members:
            values = logits.sigmoid() if self.options.function_to_apply == "sigmoid" else logits  # (B, K)
            mean, std = values.mean(-1), values.std(-1, correction=0)  # (B,), (B,)
            self.uncertainty = RowMean(float(std.mean()), std.numel()) if std.numel() else None
            if self.options.output == "uncertainty":
                return as_scores(std, len(responses), self.name)
            return as_scores(mean - self.options.uncertainty_weight * std, len(responses), self.name)
        if self.options.function_to_apply == "softmax":
            values = logits.softmax(-1)[:, self.label]
        elif self.options.function_to_apply == "sigmoid":
            values = logits[:, self.label].sigmoid()
        else:
            values = logits[:, self.label]
        return as_scores(values, len(responses), self.name)

    def metrics(self) -> dict[str, float | RowMean]:
        """The members' mean std on the last batch scored (`uncertainty`, a `RowMean` of its rows)."""
        return {} if self.uncertainty is None else {"uncertainty": self.uncertainty}


@dataclass
class ProfanityOptions(SourceOptions):
    """1 - P(offensive) from alt-profanity-check (a linear SVM on words, trained on labelled tweets)."""

    text: str = "{response}"
    """What is checked: a template over {prompt} and {response}."""


class ProfanityReward:
    """Clean-language reward in [0, 1]: 1 - P(offensive) from `alt-profanity-check`.

    The model (a calibrated linear SVM over bag-of-words features) is fast on a CPU and knows obscenity
    and insults, not subtler toxicity; a judge or a neural classifier covers those.
    """

    def __init__(self, options: ProfanityOptions):
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise ImportError(
                "the 'profanity' reward needs alt-profanity-check: pip install alt-profanity-check "
                "(or pip install 'alignkit[rewards]')"
            ) from None
        self.options, self.name, self.weight = options, options.name, options.weight
        self._predict_prob = predict_prob

    @staticmethod
    def check(options: ProfanityOptions, where: str) -> None:
        check_template(options.text, "text", where)

    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        check_batch(prompts, responses)
        texts = [fill(self.options.text, p, r) for p, r in zip(prompts, responses)]
        if not texts:
            return torch.zeros(0)
        offensive = torch.as_tensor(self._predict_prob(texts), dtype=torch.float32)
        return as_scores(1.0 - offensive, len(texts), self.name)

    def metrics(self) -> dict[str, float]:
        return {}
