"""Preference rows with images, for vision-language models (LLaVA, Qwen2-VL, ...): reading, validating,
tokenising with the model's processor, and collating.

A row is a conversational preference row plus ``images``, one per ``{"type": "image"}`` part of the prompt
messages, in order: a path relative to the data file (or absolute), or base64 (optionally a
``data:image/...;base64,`` URI)::

    {"images": ["img/cat.png"],
     "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
     "chosen": {"role": "assistant", "content": "A cat."}, "rejected": {"role": "assistant", "content": "A dog."}}

The prompt is rendered with the processor's chat template, which writes one image placeholder per image.
The boundary between prompt and completion is found on the text as for text-only rows
(`tokenize.encode_prompt_completions`, before expansion, where it is exact); then the processor expands each
placeholder to the image's tokens (their number depends on the model and, for Qwen2-VL, on the image size)
and the prompt ids are replaced by the expanded ones, so the completion tokens, and only they, are scored.
Images are decoded again per batch (pixel tensors are far larger than the ids and are not cached).
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.data.chat import (
    Issues,
    json_type,
    message_problems,
    render_prompt_and_completion,
    reply_message,
    with_system_prompt,
)
from alignkit.data.collate import collate_pairs_shared_prompt, pad_sequences, pair_columns
from alignkit.data.load import load_row_file
from alignkit.data.parse import margin_field, preference_field
from alignkit.data.readers import DataError
from alignkit.data.rows import PreferenceData, PreferenceRow
from alignkit.data.tokenize import (
    TokenStats,
    encode_prompt_completions,
    fingerprint,
    tokenize_preference_rows,
)

# Processor outputs that are per text token (padded with 0 over completions) rather than per image.
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
TEXT_KEYS = ("input_ids", "attention_mask", *TOKEN_TYPE_KEYS)
VISION_FORMAT = (
    "{images: [path or base64, ...], prompt: [messages with one {type: image} part per image], "
    "chosen: assistant message, rejected: assistant message}"
)


# ---------------------------------------------------------------------------------------------
# the processor


def load_processor(name_or_path: str, trust_remote_code: bool = False):
    """The model's processor (AutoProcessor: tokenizer, image processor, chat template), with a pad token.

    Processors that also carry a video processor (Qwen2-VL) need torchvision to build it; without
    torchvision the processor is built from its tokenizer and image processor alone (`image_only_processor`),
    which is all image rows need."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except ImportError as e:
        if "orchvision" not in str(e):
            raise
        config = json.loads((Path(name_or_path) / "processor_config.json").read_text())
        import transformers

        cls = getattr(transformers, config["processor_class"])
        template = Path(name_or_path) / "chat_template.jinja"
        processor = image_only_processor(
            cls,
            AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code),
            AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code),
            template.read_text() if template.is_file() else None,
        )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return processor


def image_only_processor(cls, image_processor, tokenizer, chat_template: str | None):
    """An instance of processor class `cls` without its video processor (which needs torchvision); it saves
    its tokenizer, image processor, chat template and processor_config.json, which `load_processor` reads
    back."""

    def check_argument_for_proper_class(self, name, argument):
        return None if argument is None else cls.check_argument_for_proper_class(self, name, argument)

    def save_pretrained(self, path, **kwargs):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / "processor_config.json").write_text(json.dumps({"processor_class": cls.__name__}))
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)

    sub = type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})
    sub.save_pretrained = save_pretrained
    return sub(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template,
    )


def processor_fingerprint(processor) -> str:
    """Identity of what the processor adds to the tokenizer: its chat template and image settings."""
    image = processor.image_processor.to_dict() if getattr(processor, "image_processor", None) else {}
    return fingerprint(getattr(processor, "chat_template", None), image, type(processor).__name__)


# ---------------------------------------------------------------------------------------------
# images


def read_image(ref: str, base: Path | None = None):
    """The RGB image `ref` names: a path (relative to `base`, the data file's folder) or base64 data (a
    `data:...;base64,` URI or bare). Raises ValueError with the reason when it cannot be read."""
    from PIL import Image

    if ref.startswith("data:"):
        data = ref.partition(",")[2]
    else:
        path = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
        if path.is_file():
            try:
                with Image.open(path) as image:
                    return image.convert("RGB")
            except Exception as e:
                raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None
        data = ref
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except Exception:
        what = (
            "not readable base64 image data"
            if ref.startswith("data:")
            else f"no image file {path}, nor base64"
        )
        raise ValueError(
            f"{what} (expected a path relative to the data file, or base64 image data)"
        ) from None


def corrupt_image(image, seed: int, mode: str = "crop", keep: float = 0.2):
    """mDPO's corrupted image m': a random box holding a share u ~ U(0, keep] of the image's area (seeded by
    `seed`), either cropped and resized back to the image's size (`crop`) or left in place with everything
    else set to black (`mask`). The size is kept, so the image has as many tokens as the original."""
    from PIL import Image

    rng = random.Random(seed)
    W, H = image.size
    share = max(rng.uniform(0.0, keep), 1.0 / (W * H))
    w, h = max(1, round(W * share**0.5)), max(1, round(H * share**0.5))
    x, y = rng.randint(0, W - w), rng.randint(0, H - h)
    box = (x, y, x + w, y + h)
    if mode == "crop":
        return image.crop(box).resize((W, H), Image.BILINEAR)
    if mode == "mask":
        out = Image.new(image.mode, image.size)
        out.paste(image.crop(box), box[:2])
        return out
    raise ValueError(f"mdpo_corruption '{mode}' is not one of crop, mask")


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class VisionPreferenceRow(PreferenceRow):
    """A preference row whose prompt shows images: `images` holds each one's reference (a resolved path or
    base64 data), in the order of the prompt's image parts."""

    images: list[str] = field(default_factory=list)
    token_types: dict[str, list[int]] = field(default_factory=dict)
    """The processor's per-token type columns over the expanded prompt (set when tokenised)."""


def _content_problems(message: Any, where: str) -> tuple[list[tuple[str, str]], int]:
    """Problems of a message whose content may be a list of parts ({type: text, text} or {type: image}),
    and its number of image parts."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message_problems(message, where), 0
    problems = message_problems({**message, "content": ""}, where)
    n_images = 0
    for k, part in enumerate(message["content"]):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            n_images += 1
        elif kind != "text" or not isinstance(part.get("text"), str):
            problems.append(
                (
                    f"{where}.content[{k}]",
                    f"found {json_type(part)} {part!r:.60} (expected {{type: image}} or "
                    "{type: text, text: string})",
                )
            )
    return problems, n_images


def _vision_row(
    record: dict, processor: Any, base: Path | None, issues: Issues, *, template: dict
) -> VisionPreferenceRow | None:
    n_issues = len(issues)
    preference, margin = preference_field(record, issues), margin_field(record, issues)
    images, prompt = record.get("images"), record.get("prompt")
    if isinstance(images, str):
        images = [images]
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        issues.append(("images", f"found {json_type(images)} (expected a list of paths or base64 strings)"))
        images = None
    n_parts = 0
    if not isinstance(prompt, list) or not prompt:
        found = "an empty list" if prompt == [] else json_type(prompt)
        issues.append(("prompt", f"found {found} (expected a list of messages; {VISION_FORMAT})"))
    else:
        for i, message in enumerate(prompt):
            problems, n = _content_problems(message, f"prompt[{i}]")
            issues.extend(problems)
            n_parts += n
    replies = [reply_message(record.get(k), k, issues) for k in ("chosen", "rejected")]
    if images is not None and len(issues) == n_issues and len(images) != n_parts:
        issues.append(
            (
                "images",
                f"{len(images)} images for {n_parts} {{type: image}} parts in the prompt "
                "(expected one image per part, in order)",
            )
        )
    resolved = []
    for k, ref in enumerate(images or []):
        try:
            read_image(ref, base)
        except ValueError as e:
            issues.append((f"images[{k}]", str(e)))
        local = base is not None and not ref.startswith("data:") and (base / ref).is_file()
        resolved.append(str((base / ref).resolve()) if local else ref)
    if len(issues) > n_issues:
        return None
    texts = []
    prompt = with_system_prompt(prompt, template.get("system_prompt"))  # as a text part, as the row's
    for key, reply in zip(("chosen", "rejected"), replies):
        try:
            prompt_text, completion = render_prompt_and_completion(
                processor,
                prompt,
                reply,
                texts[0] if texts else None,
                template_kwargs=template.get("chat_template_kwargs"),
            )
        except Exception as e:
            issues.append((key, f"cannot render with the processor's chat template: {e}"))
            return None
        texts = [prompt_text, *texts[1:], completion]
    return VisionPreferenceRow(*texts, preference=preference, margin=margin, images=resolved)


def load_vision_rows(
    source: str,
    split: str | None,
    processor: Any,
    skipped=None,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> PreferenceData:
    """Read and validate preference rows with images (see the module docstring); every problem in the source
    is reported at once (file:line, field), or, given `skipped` (on_bad_rows=skip), the bad rows are left out
    and listed there. Images are opened once here, so an unreadable one fails before any model loads. The
    processor's chat template gets `system_prompt` and `chat_template_kwargs`, as text rows' does
    (`alignkit.data.load`)."""
    base = Path(source).parent if Path(source).is_file() else None

    def parse(record: dict, processor: Any, issues: Issues, *, template: dict) -> VisionPreferenceRow | None:
        return _vision_row(record, processor, base, issues, template=template)

    settings = {"system_prompt": system_prompt, "chat_template_kwargs": chat_template_kwargs}
    rows = load_row_file(
        source, split, processor, parse, kind="preference-with-images", skipped=skipped, **settings
    )
    return PreferenceData(rows)


# ---------------------------------------------------------------------------------------------
# tokenising


def expand_prompt(processor, prompt: str, images: list, prompt_ids: list[int]) -> tuple[list[int], dict]:
    """`prompt_ids` (the first tokens of `prompt`, as `encode_prompt_completions` cut them) with every image
    placeholder expanded by the processor, and the processor's per-token type columns over them.

    The processor tokenises `prompt` with the images; the tokens after the last image are the same with or
    without expansion, so the expanded prompt is the processor's ids less the tail `prompt_ids` left out."""
    tokenizer = processor.tokenizer
    add_special = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
    plain = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    out = processor(text=[prompt], images=images or None, add_special_tokens=add_special)
    expanded = list(out["input_ids"][0])
    tail = len(plain) - len(prompt_ids)
    keep = len(expanded) - tail
    if plain[: len(prompt_ids)] != list(prompt_ids) or expanded[keep:] != plain[len(prompt_ids) :]:
        raise ValueError(
            "the processor's tokens for the prompt do not extend the tokenizer's (cannot place the image "
            "tokens); use the model's own processor"
        )
    types = {k: list(out[k][0])[:keep] for k in TOKEN_TYPE_KEYS if k in out}
    return expanded[:keep], types


def image_token_count(processor, ids: list[int]) -> int:
    """How many of `ids` are image tokens: the tokenizer's `image_token` where it names one (Gemma 3's
    processor calls its placeholder <start_of_image> the image token; it expands to <image_soft_token>s),
    else the processor's."""
    image_id = getattr(processor.tokenizer, "image_token_id", None)
    if image_id is None:
        image_id = getattr(processor, "image_token_id", None)
    if image_id is None:
        image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return sum(1 for t in ids if t == image_id)


def tokenize_vision_rows(
    rows: list[VisionPreferenceRow], processor, max_length: int, max_prompt_length: int
) -> tuple[list[dict], TokenStats]:
    """Rows -> examples {prompt_ids (image tokens expanded), chosen_ids, rejected_ids, images, preference,
    line, and the processor's per-token type columns as prompt_<key>}: each row is tokenised here, then
    truncated and checked like a pre-tokenised text row (`tokenize_preference_rows`). A prompt longer than
    max_prompt_length is an error (file:line) when it holds image tokens: cutting them would leave the
    model images without their tokens."""
    tokenizer, too_long, kept = processor.tokenizer, [], {}
    for row in rows:
        prompt_ids, (chosen, rejected) = encode_prompt_completions(
            tokenizer, row.prompt, [row.chosen, row.rejected]
        )
        images = [read_image(ref) for ref in row.images]
        prompt_ids, types = expand_prompt(processor, row.prompt, images, prompt_ids)
        n_image = image_token_count(processor, prompt_ids)
        if n_image and len(prompt_ids) > max_prompt_length:
            too_long.append((row, len(prompt_ids), n_image))
            continue
        row.prompt_ids, row.chosen_ids, row.rejected_ids, row.token_types = (
            prompt_ids,
            chosen,
            rejected,
            types,
        )
        kept[row.line] = row
    if too_long:
        row, n, n_image = too_long[0]
        longest = max(n for _, n, _ in too_long)
        raise DataError(
            f"the prompt is {n} tokens, {n_image} of them image tokens, over max_prompt_length="
            f"{max_prompt_length}: truncating it would cut image tokens. Raise max_prompt_length to at least "
            f"{longest} (and max_length above it), or use smaller images",
            row.source,
            row.line,
            "prompt",
            lines=sorted(r.line for r, _, _ in too_long),
        )
    examples, stats = tokenize_preference_rows(list(kept.values()), tokenizer, max_length, max_prompt_length)
    for e in examples:
        row, P = kept[e["line"]], len(e["prompt_ids"])
        e["images"] = row.images
        # A text-only prompt may have been cut from the left: its types are the last P.
        e.update({f"prompt_{k}": v[len(v) - P :] for k, v in row.token_types.items()})
    return examples, stats


def prepare_vision_data(cfg, processor, log=print) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, eval) examples of preference rows with images for `cfg` (cached like text rows)."""
    from alignkit.data.prepare import prepare_cached

    def load(source: str, split: str, skipped, **template):
        data = load_vision_rows(source, split, processor, skipped, **template)
        return data.rows, data.dropped

    def tokenize(rows, _tokenizer, max_length, max_prompt_length):
        return tokenize_vision_rows(rows, processor, max_length, max_prompt_length)

    kind = f"vision-preference-{processor_fingerprint(processor)}"
    return prepare_cached(cfg, processor.tokenizer, load, tokenize, kind=kind, log=log)


# ---------------------------------------------------------------------------------------------
# collating


@dataclass(frozen=True)
class Corruption:
    """How mDPO corrupts each pair's images: `corrupt_image(image, seed + line, mode, keep)`."""

    mode: str = "crop"
    keep: float = 0.2
    seed: int = 0


def collate_vision_pairs(
    examples: list[dict], pad_id: int, *, processor, corruption: Corruption | None = None
) -> dict:
    """Examples with images -> the two-row layout of `collate_pairs` (B chosen rows, then B rejected) plus,
    with `corruption` (mDPO), B rows of prompt + chosen whose images are corrupted; and the image inputs.

    Each image is encoded once: `pixel_values` (and `image_grid_thw`, `image_sizes`, ...) hold the pairs'
    images, then their corrupted copies; `image_order` lists, for the image placeholders of the rows in
    order, which encoded image fills them (a pair's images serve its chosen and its rejected row).
    The processor's per-token type columns (`mm_token_type_ids`, `token_type_ids`) cover the prompt tokens
    and are 0 over padding and completions, except `token_type_ids` over completions for processors that
    mark a training suffix (`completion_token_type`: PaliGemma's prefix-LM).
    """
    groups = [("chosen_ids", False), ("rejected_ids", False)] + ([("chosen_ids", True)] if corruption else [])
    sequences, starts, columns = [], [], {}
    for key, _ in groups:
        for e in examples:
            sequences.append(e["prompt_ids"] + e[key])
            starts.append(len(e["prompt_ids"]))
    batch = {**pad_sequences(sequences, starts, pad_id), **pair_columns(examples)}
    R, T = batch["input_ids"].shape
    for name in TOKEN_TYPE_KEYS:
        if f"prompt_{name}" in examples[0]:
            columns[name] = torch.zeros(R, T, dtype=torch.long)
            completion_type = completion_token_type(processor) if name == "token_type_ids" else 0
            for r, e in enumerate(examples * len(groups)):
                types = e[f"prompt_{name}"]
                columns[name][r, : len(types)] = torch.tensor(types, dtype=torch.long)
                columns[name][r, len(types) : len(sequences[r])] = completion_type
    batch.update(columns)
    real = [read_image(ref) for e in examples for ref in e["images"]]
    if not real:
        return batch
    n = len(real)
    order = list(range(n)) * 2
    if corruption:
        seeds = [corruption.seed + e["line"] * 1000 + k for e in examples for k in range(len(e["images"]))]
        real += [corrupt_image(im, s, corruption.mode, corruption.keep) for im, s in zip(real, seeds)]
        order += list(range(n, 2 * n))
    return {**batch, **_image_columns(processor, real, order)}


def completion_token_type(processor) -> int:
    """The `token_type_ids` value of completion tokens: 1 for processors that take a training `suffix`
    (PaliGemma: the prefix, type 0, attends both ways; the suffix, type 1, causally, as the processor marks
    it), else 0 (Gemma 3: 1 marks image tokens only)."""
    import inspect

    return int("suffix" in inspect.signature(type(processor).__call__).parameters)


def collate_vision_shared_prompt(examples: list[dict], pad_id: int, *, processor) -> dict:
    """Examples with images -> `collate_pairs_shared_prompt`'s rows of [prompt | chosen | rejected] segments
    (a 4D mask; the prompt, image tokens included, computed once per pair) and the image inputs: each pair's
    images encoded once, in the order the segments' image placeholders appear row by row. `prompt_spans`
    (S, 4) holds each segment's row, prompt offset, prompt length and number of images, in that order, for
    models that place tokens with multimodal RoPE (`alignkit.models.vision.mrope_positions`)."""
    batch = collate_pairs_shared_prompt(examples, pad_id)
    R, T = batch["input_ids"].shape
    placed = []  # (pair, row, offset of its prompt) in the order the backbone fills image placeholders
    for r in range(R):
        pairs = batch["segment"][r][batch["segment"][r] >= 0].unique_consecutive().tolist()
        for b in pairs:
            first = int((batch["segment"][r] == b).nonzero()[0])
            placed.append((b, r, first - len(examples[b]["prompt_ids"])))
    for name in TOKEN_TYPE_KEYS:
        if f"prompt_{name}" in examples[0]:
            batch[name] = torch.zeros(R, T, dtype=torch.long)
            for b, r, o in placed:
                types = examples[b][f"prompt_{name}"]
                batch[name][r, o : o + len(types)] = torch.tensor(types, dtype=torch.long)
    images = [read_image(ref) for b, _, _ in placed for ref in examples[b]["images"]]
    spans = [[r, o, len(examples[b]["prompt_ids"]), len(examples[b]["images"])] for b, r, o in placed]
    batch["prompt_spans"] = torch.tensor(spans, dtype=torch.long)
    if not images:
        return batch
    return {**batch, **_image_columns(processor, images, list(range(len(images))))}


def _image_columns(processor, images: list, order: list[int]) -> dict:
    """The image processor's inputs for `images` (each encoded once) and `image_order`: which of them fills
    each image placeholder run of the batch, in order."""
    pixels = processor.image_processor(images=images, return_tensors="pt")
    return {**{k: torch.as_tensor(v) for k, v in pixels.items()}, "image_order": torch.tensor(order)}
