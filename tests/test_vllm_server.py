"""The weight transports of server mode (generation/weight_sync.py) and what travels between a trainer and
`alignkit vllm-serve` (generation/wire.py): the HTTP stream against the server's own readers, the NCCL
transport's requests against a stand-in server (its collectives need GPUs). No vLLM needed."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch


class StandIn(BaseHTTPRequestHandler):
    """A stand-in for `alignkit vllm-serve` that records what it is sent and answers as the server does;
    an /update_weights body is read with the server's own readers."""

    def do_GET(self):  # noqa: N802
        self.server.log.append(("GET", self.path, None))
        self.answer({"status": "ok", "world_size": 2})

    def do_POST(self):  # noqa: N802
        from alignkit.generation.wire import ChunkedBody, read_weight_frames

        if self.path == "/update_weights":
            tensors = read_weight_frames(ChunkedBody(self.rfile).read)
            self.server.log.append(("POST", self.path, tensors))
            self.answer({"tensors": len(tensors)})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.log.append(("POST", self.path, body))
        self.answer({})

    def answer(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    httpd.log = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def weights() -> list[tuple[str, torch.Tensor]]:
    embed = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return [
        ("model.embed_tokens.weight", embed),
        ("model.norm.weight", torch.ones(4, dtype=torch.bfloat16)),
        ("lm_head.weight", embed),  # tied: one storage, two names
        (
            "model.layers.0.mlp.up_proj.weight",
            torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).t(),
        ),
    ]


def test_the_http_transport_streams_every_tensor_in_frames_the_server_reads_back(stand_in):
    """Frames of at most 40 bytes of tensor data (so every tensor is a frame of its own) reach the
    server's readers whole, names, dtypes and values kept; a stream cut short is refused."""
    from alignkit.generation.weight_sync import HTTPWeights
    from alignkit.generation.wire import read_weight_frames, weight_frames

    url = f"http://127.0.0.1:{stand_in.server_port}"
    HTTPWeights(url, chunk_mb=40 / 2**20, timeout=10).push(iter(weights()))
    [(method, path, received)] = stand_in.log
    assert (method, path) == ("POST", "/update_weights")
    assert [n for n, _ in received] == [n for n, _ in weights()]
    for (_, sent), (_, got) in zip(weights(), received):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
    frames = list(weight_frames(weights(), max_bytes=40))
    assert len(frames) == 5  # four tensors, then the end frame
    stream = b"".join(frames[:-1])  # no end frame
    with pytest.raises(ValueError, match="ended"):
        read_weight_frames(io.BytesIO(stream).read)


def test_the_nccl_transport_posts_each_tensors_shape_then_broadcasts_it(stand_in, monkeypatch):
    """NCCLWeights' requests and collectives, against the stand-in server and a recording communicator
    (the real one needs GPUs): the group has the server's 2 workers and the trainer as rank 2; each tensor
    is announced (name, dtype, shape) and then broadcast from rank 2, a barrier after each."""
    from alignkit.generation import weight_sync

    log = stand_in.log

    class Recording:
        def __init__(self, host, port, *, rank, world_size, device):
            log.append(("group", (host, port, rank, world_size), None))
            self.group = self

        def broadcast(self, tensor, src):
            log.append(("broadcast", src, tensor))

        def barrier(self):
            log.append(("barrier", None, None))

    monkeypatch.setattr(weight_sync, "nccl_communicator", Recording)
    url = f"http://127.0.0.1:{stand_in.server_port}"
    transport = weight_sync.NCCLWeights(url, port=51216, device=torch.device("cpu"), timeout=10)
    sent = weights()[:2]
    transport.push(iter(sent))
    transport.close()
    transport.close()  # once only
    assert [entry[:2] for entry in log] == [
        ("GET", "/health"),
        ("POST", "/init_communicator"),
        ("group", ("127.0.0.1", 51216, 2, 3)),
        ("POST", "/update_named_param"),
        ("broadcast", 2),
        ("barrier", None),
        ("POST", "/update_named_param"),
        ("broadcast", 2),
        ("barrier", None),
        ("POST", "/close_communicator"),
    ]
    assert log[1][2] == {"host": "0.0.0.0", "port": 51216, "world_size": 3, "client_device_uuid": ""}
    assert log[3][2] == {"name": "model.embed_tokens.weight", "dtype": "float32", "shape": [3, 4]}
    assert log[6][2] == {"name": "model.norm.weight", "dtype": "bfloat16", "shape": [4]}
    assert torch.equal(log[4][2], sent[0][1]) and torch.equal(log[7][2], sent[1][1])
    with pytest.raises(ValueError, match="weight_transport=http"):
        weight_sync.make_transport("nccl", url, device=torch.device("cpu"), settings=None)
