"""How a trainer's weights reach an `alignkit vllm-serve` server: one interface (`WeightTransport.push`),
two implementations, chosen by `generation.vllm.weight_transport` (`make_transport`).

- `HTTPWeights` (CPUs, small models): one POST to /update_weights streams the named tensors as
  safetensors frames of at most `weight_chunk_mb` (generation.wire). The server collects the whole
  upload (a broken one leaves its weights as they were), then reloads them in place in one pass (vLLM's
  `reload_weights`, which regroups a layer's checkpoint tensors, e.g. q/k/v into one fused weight, and
  redoes the kernel-layout processing a CPU engine applies). It needs the engine's worker in the
  server's process: one worker, tensor_parallel_size 1.
- `NCCLWeights` (GPUs; TRL's vllm-serve pattern): the trainer's main process joins a NCCL group with the
  server's workers (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`, beside the trainer's own
  process group): the workers are ranks 0 .. W-1, the trainer rank W. Per tensor it posts the name, dtype
  and shape to /update_named_param, then broadcasts the tensor from its GPU; every worker
  (`NCCLWorkerExtension`, mixed into vLLM's workers by `worker_extension_cls`) receives it into a fresh
  buffer and loads it (`model.load_weights`), so the server holds one extra tensor at a time and the
  weights never pass through host memory. UNTESTED until a GPU run: no GPU was available where it was
  written; its requests are tested against a stand-in server (tests/test_vllm_server.py).

Either way the trainer then posts /reset_prefix_cache: cached prefixes were computed by the old weights.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import urlsplit

import torch

from alignkit.generation.wire import answer_error, request_json, weight_frames


class WeightTransport(Protocol):
    """Pushes a trainer's weights into the server's engine."""

    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send every (name, tensor) of `weights` (checkpoint names, full tensors) and have the server's
        engine load them; returns when it has."""


def make_transport(name: str, url: str, *, device: torch.device, settings) -> WeightTransport:
    """The transport `name` (auto, http, nccl; auto is nccl when `device`, the policy's, is a GPU) to the
    server at `url`; `settings` is the VLLMSettings (weight_chunk_mb, nccl_port, server_timeout)."""
    if name == "auto":
        name = "nccl" if device.type == "cuda" else "http"
    if name == "http":
        return HTTPWeights(url, chunk_mb=settings.weight_chunk_mb, timeout=settings.server_timeout)
    if device.type != "cuda":
        raise ValueError(
            f"generation.vllm.weight_transport=nccl broadcasts from the trainer's GPU; the policy is on "
            f"{device.type}: use weight_transport=http"
        )
    return NCCLWeights(url, port=settings.nccl_port, device=device, timeout=settings.server_timeout)


class HTTPWeights:
    """The weights as safetensors frames in one streamed POST (module docstring)."""

    def __init__(self, url: str, *, chunk_mb: float, timeout: float):
        self.url, self.max_bytes, self.timeout = url, max(1, int(chunk_mb * 2**20)), timeout

    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        import http.client

        parts = urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout)
        try:  # an iterable body without a length goes out chunked, one frame at a time
            connection.request(
                "POST",
                "/update_weights",
                body=weight_frames(weights, self.max_bytes),
                headers={"Content-Type": "application/octet-stream"},
            )
            response = connection.getresponse()
            body = response.read()
        except OSError as e:
            raise ConnectionError(f"vllm-serve at {self.url}: /update_weights failed: {e}") from e
        finally:
            connection.close()
        if response.status != 200:
            raise answer_error(self.url, "/update_weights", response.status, body)


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID (empty off CUDA): the server refuses a trainer on one of its own GPUs."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


def nccl_communicator(host: str, port: int, *, rank: int, world_size: int, device: torch.device):
    """The trainer's side of the weight-sync group: a vLLM StatelessProcessGroup (a TCP rendezvous at
    host:port, where the server's first worker listens) and a PyNcclCommunicator on `device`."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


class NCCLWeights:
    """Weights broadcast over NCCL from the trainer's GPU to the server's workers (module docstring).
    UNTESTED until a GPU run.

    Built once, on the trainer's main process only: it asks the server for its worker count, has the
    server's workers open the group (POST /init_communicator: the server answers first, then its workers
    wait at the rendezvous) and joins it as the last rank. The group is closed when the process exits."""

    def __init__(self, url: str, *, port: int, device: torch.device, timeout: float):
        self.url, self.timeout = url, timeout
        workers = int(request_json(url, "/health", timeout=timeout)["world_size"])
        self.rank, world_size = workers, workers + 1
        request_json(
            url,
            "/init_communicator",
            # the first worker listens on every interface; the trainer connects to the server's host
            {
                "host": "0.0.0.0",
                "port": port,
                "world_size": world_size,
                "client_device_uuid": device_uuid(device),
            },
            timeout=timeout,
        )
        self.communicator = nccl_communicator(
            urlsplit(url).hostname, port, rank=self.rank, world_size=world_size, device=device
        )
        atexit.register(self.close)

    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            tensor = tensor.detach().contiguous()
            meta = {
                "name": name,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
            }
            request_json(self.url, "/update_named_param", meta, timeout=self.timeout)
            self.communicator.broadcast(tensor, src=self.rank)
            self.communicator.group.barrier()  # the workers have it before the next name is posted

    def close(self) -> None:
        """Leave the group and have the server close its side (a later trainer opens a new one)."""
        if self.communicator is None:
            return
        self.communicator = None
        try:
            request_json(self.url, "/close_communicator", {}, timeout=self.timeout)
        except (ConnectionError, RuntimeError):
            pass  # the server is gone already: nothing to close there


class NCCLWorkerExtension:
    """The server's side of `NCCLWeights`, mixed into every vLLM worker of an `alignkit vllm-serve`
    engine (`worker_extension_cls`) and called through `LLM.collective_rpc`. UNTESTED until a GPU run
    (on a CPU the server refuses /init_communicator before calling it)."""

    weight_group = None
    """The PyNcclCommunicator of the weight-sync group, once a trainer has opened it."""
    weight_source = None
    """The trainer's rank in the group (the last one)."""

    def open_weight_group(self, host: str, port: int, world_size: int, client_device_uuid: str) -> None:
        """Join the group as this worker's rank in the engine's world (the first one listens at
        host:port), replacing an earlier group (a trainer that died without closing its own)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        if client_device_uuid == str(torch.cuda.get_device_properties(self.device).uuid):
            raise RuntimeError(
                "the trainer's GPU is one of the server's: NCCL cannot broadcast between two ranks of one "
                "device; give the server and the trainer different GPUs (CUDA_VISIBLE_DEVICES)"
            )
        self.close_weight_group()
        rank = get_world_group().rank
        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.weight_group = PyNcclCommunicator(group, device=self.device)
        self.weight_source = world_size - 1

    def receive_weight(self, name: str, dtype: str, shape: list[int]) -> None:
        """Receive the tensor the trainer broadcasts next and load it into the model under `name`."""
        if self.weight_group is None:
            raise RuntimeError("no weight-sync group: the trainer posts /init_communicator first")
        weight = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        self.weight_group.broadcast(weight, src=self.weight_source)
        self.weight_group.group.barrier()
        self.model_runner.get_model().load_weights(weights=[(name, weight)])

    def close_weight_group(self) -> None:
        """Drop the weight-sync group (its NCCL communicator is freed with it)."""
        self.weight_group = None
        self.weight_source = None


NCCL_EXTENSION = f"{NCCLWorkerExtension.__module__}.{NCCLWorkerExtension.__qualname__}"
"""The qualified name vLLM's `worker_extension_cls` takes."""
