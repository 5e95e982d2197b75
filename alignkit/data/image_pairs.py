"""Image preference pairs for Diffusion-DPO: reading, validating every image before training, and turning
images into pixel tensors.

Row layouts (detected per row; extra keys are ignored):

1. ``{"prompt": str, "chosen_image": IMAGE, "rejected_image": IMAGE}``
2. Pick-a-Pic: ``{"caption": str, "jpg_0": IMAGE, "jpg_1": IMAGE, "label_0": 1 | 0 | 0.5}``: label_0 = 1
   prefers jpg_0, 0 prefers jpg_1, 0.5 is a tie, which has no preferred image: ties are dropped and
   counted (`ImagePairs.ties`), never trained as wins.

IMAGE is a path (relative to the data file's folder, or absolute), a base64 string (optionally a
``data:image/...;base64,`` URI), raw bytes (parquet files and datasets hold them), or a ``{"bytes": ...,
"path": ...}`` mapping (a `datasets` Image column). Every image is opened and decoded once while the rows
are read: an unreadable one, or one whose mode does not convert to RGB, is reported as
``file:line: field 'chosen_image': ...``, all of a file's problems in one error (alignkit.data.readers).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.data.readers import DataError, DroppedRow, Problems, read_records

# PIL modes that convert to RGB without losing what the image shows (alpha is dropped); 16-bit and float
# modes ("I", "I;16", "F") do not convert faithfully and are refused.
RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")
TIE = 0.5


@dataclass
class ImagePair:
    """A validated pair: the prompt and the two images as loadable data (a Path or the encoded bytes)."""

    prompt: str
    chosen: Path | bytes
    rejected: Path | bytes
    source: str = ""
    line: int | None = None


@dataclass
class ImagePairs:
    """The usable pairs of a source and the number of ties dropped (rows left out by on_bad_rows=skip are
    appended to the loader's `skipped` list)."""

    rows: list[ImagePair]
    ties: int = 0


def image_data(value: Any, base: Path | None) -> tuple[Path | bytes | None, str | None]:
    """(loadable data, None) for an IMAGE value (see the module docstring), or (None, why it is not one)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            return None, "an image mapping needs 'bytes' or 'path'"
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None
    if not isinstance(value, str) or not value:
        return None, f"expected an image path, base64 string or bytes, got {type(value).__name__}"
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header:
            return None, "a data URI must be base64-encoded (data:image/png;base64,...)"
        return _decoded(payload)
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_file():
        return path, None
    if len(value) >= 64 and "." not in value[-6:]:  # long and without a file extension: base64 data
        return _decoded(value)
    return None, f"no such file (looked for {path})"


def _decoded(text: str) -> tuple[bytes | None, str | None]:
    try:
        return base64.b64decode(text, validate=True), None
    except (binascii.Error, ValueError):
        return None, "not valid base64 image data"


def open_image(data: Path | bytes):
    """The decoded PIL image of `data` (a path or encoded bytes); raises OSError / ValueError when it is not
    a readable image."""
    from PIL import Image

    image = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    image.load()  # decode now: a truncated file fails here, not in the middle of training
    return image


def image_problem(data: Path | bytes) -> str | None:
    """Why `data` cannot be trained on (unreadable, or a mode that does not convert to RGB), or None."""
    try:
        image = open_image(data)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"cannot read the image ({type(e).__name__}: {e})"
    if image.mode not in RGB_MODES:
        return f"image mode {image.mode} does not convert to RGB (expected one of {', '.join(RGB_MODES)})"
    if min(image.size) < 1:
        return f"image has size {image.size}"
    return None


def _text(record: dict, key: str, problems: list[tuple[str, str]]) -> str | None:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append((key, f"expected a non-empty string, got {type(value).__name__}"))
        return None
    return value


def parse_pair(record: dict, base: Path | None) -> tuple[ImagePair | None, list[tuple[str, str]], bool]:
    """(pair, [(field, problem)], is_tie) for one record in either layout (see the module docstring)."""
    problems: list[tuple[str, str]] = []
    if "jpg_0" in record or "label_0" in record:
        prompt = _text(record, "caption", problems)
        label = record.get("label_0")
        if isinstance(label, bool) or not isinstance(label, int | float) or label not in (0, 1, TIE):
            problems.append(
                ("label_0", f"expected 1 (jpg_0 preferred), 0 (jpg_1) or 0.5 (tie), got {label!r}")
            )
        keys = ("jpg_0", "jpg_1") if label != 0 else ("jpg_1", "jpg_0")
    else:
        prompt = _text(record, "prompt", problems)
        keys, label = ("chosen_image", "rejected_image"), 1
    images = []
    for key in keys:
        if key not in record:
            problems.append((key, "missing (expected an image path, base64 string or bytes)"))
            continue
        data, why = image_data(record[key], base)
        why = why or image_problem(data)
        if why:
            problems.append((key, why))
        images.append(data)
    tie = label == TIE and not problems
    if problems or tie:
        return None, problems, tie
    return ImagePair(prompt, images[0], images[1]), problems, False


def load_image_pairs(
    source: str, split: str | None = None, skipped: list[DroppedRow] | None = None
) -> ImagePairs:
    """Read and validate image preference pairs from `source` (a file or dataset, see `read_records`),
    opening every image once. All problems are raised as one DataError naming file:line and the field; given
    `skipped` (on_bad_rows=skip), bad rows are left out and appended to it instead. Ties are counted."""
    problems, rows, ties = Problems(source), [], 0
    path = Path(source).expanduser()
    base = path.parent if path.is_file() else Path.cwd()
    for line, record in read_records(source, split, problems):
        pair, found, tie = parse_pair(record, base)
        for key, why in found:
            problems.add(line, key, why)
        ties += tie
        if pair is not None:
            pair.source, pair.line = source, line
            rows.append(pair)
    problems.raise_if_any(skip=skipped is not None)
    if skipped is not None:
        skipped.extend(problems.dropped())
    if not rows:
        why = (
            f"{len(problems.lines)} bad rows, {ties} ties"
            if problems.count or ties
            else "the source is empty"
        )
        raise DataError(f"no usable image pairs ({why})", source)
    return ImagePairs(rows, ties)


def crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """How `pixel_values` fits an image: (resized width, resized height, crop top, crop left), the shorter
    side resized to `resolution` and the centre `resolution` square cut out."""
    scale = resolution / min(width, height)
    resized_w = max(resolution, math.ceil(width * scale))
    resized_h = max(resolution, math.ceil(height * scale))
    return resized_w, resized_h, (resized_h - resolution) // 2, (resized_w - resolution) // 2


def pixel_values(data: Path | bytes, resolution: int) -> torch.Tensor:
    """The image as the VAE takes it: RGB, the shorter side resized to `resolution` (bicubic), the centre
    `resolution` x `resolution` crop (`crop_box`), scaled to [-1, 1]. -> (3, resolution, resolution) float32."""
    from PIL import Image

    image = open_image(data).convert("RGB")
    resized_w, resized_h, top, left = crop_box(image.width, image.height, resolution)
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(resolution, resolution, 3).permute(2, 0, 1).float()  # (3, R, R) in [0, 255]
    return pixels / 127.5 - 1.0


def size_time_ids(data: Path | bytes, resolution: int) -> list[int]:
    """SDXL's micro-conditioning for the image as `pixel_values` crops it: [original height, width, crop top,
    crop left, target height, width] (only the image's header is read)."""
    from PIL import Image

    with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as image:
        width, height = image.size
    _, _, top, left = crop_box(width, height, resolution)
    return [height, width, top, left, resolution, resolution]
