"""What travels between a trainer and an `alignkit vllm-serve` server: JSON requests, and the frames a
trainer's weights are streamed in over HTTP. Both sides import this module, so they cannot drift apart.

A weight stream is a sequence of frames, each an 8-byte little-endian length and that many bytes of one
safetensors file (a batch of named tensors), ended by a zero-length frame. Safetensors, never pickle: the
server runs no code it is sent; and the end frame tells a complete upload from one cut short.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator

import torch

LENGTH = struct.Struct("<Q")


def request_json(url: str, path: str, payload: dict | None = None, *, timeout: float | None) -> dict:
    """GET `url + path` (or POST `payload` as JSON) and the JSON answer. A 4xx answer (the request was
    wrong: a prompt too long, a bad setting) is a ValueError, a 5xx a RuntimeError, each with the server's
    own message; a server that cannot be reached is a ConnectionError naming it. timeout None: no limit."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise answer_error(url, path, e.code, e.read()) from None
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"vllm-serve at {url}: {path} failed: {getattr(e, 'reason', e)}") from e


def answer_error(url: str, path: str, status: int, body: bytes) -> Exception:
    """The exception for the server's error answer `status` with JSON `body` ({"error": message})."""
    try:
        message = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")
    error = ValueError if 400 <= status < 500 else RuntimeError
    return error(f"vllm-serve at {url}: {path} failed ({status}): {message}")


def weight_frames(weights: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[bytes]:
    """The frames of a weight stream: (name, tensor) pairs batched into safetensors files of at most
    `max_bytes` of tensor data (a larger tensor is a batch of its own), each behind its length, then the
    end frame. A tensor is copied to the CPU as it is framed; tied weights (two names, one storage) are
    sent under both names, as the checkpoint has them."""
    from safetensors.torch import save

    batch: dict[str, torch.Tensor] = {}
    size, storages = 0, set()
    for name, tensor in weights:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if batch and size + nbytes > max_bytes:
            blob = save(batch)
            yield LENGTH.pack(len(blob)) + blob
            batch, size, storages = {}, 0, set()
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        batch[name] = tensor
        size += nbytes
    if batch:
        blob = save(batch)
        yield LENGTH.pack(len(blob)) + blob
    yield LENGTH.pack(0)


def read_weight_frames(read: Callable[[int], bytes]) -> list[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of a weight stream, read whole through `read(n)` (up to n bytes, b"" at the
    end); a ValueError when it ends before its end frame (nothing of it is then used)."""
    from safetensors.torch import load

    tensors = []
    while True:
        (length,) = LENGTH.unpack(read_exactly(read, LENGTH.size))
        if length == 0:
            return tensors
        tensors.extend(load(read_exactly(read, length)).items())


def read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    """n bytes from `read`, or a ValueError when the stream ends first."""
    parts, left = [], n
    while left:
        part = read(left)
        if not part:
            raise ValueError(f"the weight stream ended {left} bytes early (an upload cut short?)")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class ChunkedBody:
    """read(n) over a request body sent with Transfer-Encoding: chunked (what http.client sends for an
    iterable body of unknown length)."""

    def __init__(self, stream):
        self.stream, self.left, self.done = stream, 0, False

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self.left == 0:
            line = self.stream.readline(1024)
            if not line:  # the connection closed mid-body
                self.done = True
                return b""
            self.left = int(line.split(b";")[0].strip() or b"0", 16)
            if self.left == 0:
                while self.stream.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                self.done = True
                return b""
        data = self.stream.read(min(n, self.left))
        self.left -= len(data)
        if self.left == 0:
            self.stream.readline(16)  # the CRLF after a chunk's data
        return data
