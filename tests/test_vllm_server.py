"""Server mode: `alignkit vllm-serve` (generation/serve.py) and the trainer's side of it (generation/server.py,
generation/weight_sync.py), against the trainer's own numbers on the tiny Llama of tests/test_vllm.py.

The tests marked `needs_vllm` start one `alignkit vllm-serve` on a free localhost port (a subprocess, for the
whole module) and run where vLLM is installed, as tests/test_vllm.py's do (.ci/run makes a missing vLLM an
error there); the others (the wire format, the NCCL transport's requests against a stand-in server, the
timeout) need no vLLM and run everywhere."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import test_vllm as colocated
import torch
from test_vllm import HAVE_VLLM, MAX_MODEL_LEN, loop_greedy, perturbed, prompt_ids, top2_margin

REPO = Path(__file__).resolve().parents[1]
# the colocated tests' fixtures, built again for this module: the peaked tiny Llama, the trainer's model, its tokenizer
peaked_llama_dir, policy, tok = colocated.peaked_llama_dir, colocated.policy, colocated.tok
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed in this environment; its tests run in their own one: "
    "`bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest -q tests/test_vllm_server.py` (docs/vllm.md)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(peaked_llama_dir, tmp_path_factory):
    """`alignkit vllm-serve` on the peaked tiny Llama (fp32, as the trainer), killed after the module."""
    from alignkit.generation.wire import request_json

    port, log = free_port(), tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [sys.executable, "-m", "alignkit.cli", "vllm-serve", str(peaked_llama_dir), f"port={port}"]
    command += ["cpu_kv_cache_gb=0.25", f"max_model_len={MAX_MODEL_LEN}", "dtype=float32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm-serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if request_json(url, "/health", timeout=2)["status"] == "ok":
                    break
            except (ConnectionError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm-serve not ready after 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def sampler(server_url, policy, tok):
    from alignkit.config.generation import VLLMSettings
    from alignkit.generation.sampling import eos_ids
    from alignkit.generation.server import ServerSampler

    return ServerSampler(
        VLLMSettings(mode="server", server_url=server_url, server_timeout=10), eos=eos_ids(policy, tok)
    )


def greedy(sampler, model, tok, ids):
    return sampler.sample(
        model, tok, ids, num_samples=1, seed=0, max_new_tokens=16, temperature=0.0
    ).completion_ids


@needs_vllm
def test_greedy_through_the_server_equals_the_loop_backends_token_for_token(sampler, policy, tok):
    ids = prompt_ids(tok)
    sampler.sync(policy, version=100)
    expected = loop_greedy(policy, tok, ids)
    assert top2_margin(policy, ids, expected) > 1e-3  # no near-tie a kernel's rounding could flip
    assert greedy(sampler, policy, tok, ids) == expected


@needs_vllm
def test_after_an_update_and_a_sync_the_server_samples_the_new_weights(sampler, policy, tok):
    """Perturbed weights change the trainer's greedy output; after `sync` (the HTTP transport) the server's
    greedy output is the perturbed model's; a second sync of the same version pushes nothing; the next
    version brings the original weights back."""
    ids = prompt_ids(tok)
    updated = perturbed(policy)
    expected = loop_greedy(updated, tok, ids)
    assert expected != loop_greedy(policy, tok, ids)
    assert top2_margin(updated, ids, expected) > 1e-3
    sampler.sync(updated, version=101)
    assert greedy(sampler, updated, tok, ids) == expected
    sampler.sync(policy, version=101)  # same version: skipped, the server keeps the updated weights
    assert greedy(sampler, policy, tok, ids) == expected
    sampler.sync(policy, version=102)
    assert greedy(sampler, policy, tok, ids) == loop_greedy(policy, tok, ids)


@needs_vllm
def test_server_logprobs_are_the_trainers_scores(sampler, policy, tok):
    """The server's log-probs of the tokens it drew at temperature 0.8 and top_p 0.9 equal the trainer's
    scores of the same tokens under the same tempered, truncated distribution."""
    from alignkit.logprobs.completion import completion_logps
    from alignkit.rollout import layout

    ids = prompt_ids(tok)
    sampler.sync(policy, version=103)
    got = sampler.sample(
        policy, tok, ids, num_samples=3, seed=1, max_new_tokens=12, temperature=0.8, top_p=0.9
    )
    assert len(got.completion_ids) == 3 * len(ids)
    assert [len(row) for row in got.logps] == [len(row) for row in got.completion_ids]
    rows = [p for p in ids for _ in range(3)]
    input_ids, attention, completion = layout(rows, got.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        trainer = completion_logps(policy, input_ids, attention, completion, temperature=0.8, top_p=0.9)
    trainer = trainer.token_logps[completion.bool()]
    server = torch.tensor([v for row in got.logps for v in row])
    assert torch.allclose(server, trainer, atol=1e-3), float((server - trainer).abs().max())


@needs_vllm
def test_a_request_the_server_cannot_serve_is_an_error_with_its_reason(sampler, policy, tok):
    too_long = [[5] * (MAX_MODEL_LEN + 10)]
    with pytest.raises(ValueError, match=r"/generate failed \(400\).*" + str(MAX_MODEL_LEN)):
        sampler.sample(policy, tok, too_long, num_samples=1, seed=0, max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match=r"/generate failed \(400\).*'settings' has min_p"):
        sampler.sample(policy, tok, [[5, 6]], num_samples=1, seed=0, max_new_tokens=4, min_p=0.1)


@needs_vllm
def test_vllm_serve_refuses_a_model_it_cannot_serve_with_the_reason(tiny_model_dir, capsys):
    from alignkit.cli import main

    assert main(["vllm-serve", str(tiny_model_dir), f"port={free_port()}"]) == 1
    error = capsys.readouterr().err
    assert "alignkit vllm-serve: error:" in error and "head sizes" in error and "has 8" in error


def test_a_sampler_without_a_server_fails_after_its_timeout_naming_the_url():
    from alignkit.config.generation import VLLMSettings
    from alignkit.generation.server import ServerSampler

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConnectionError) as error:
        ServerSampler(VLLMSettings(mode="server", server_url=url, server_timeout=1.5), eos={2})
    assert 1.5 <= time.monotonic() - start < 10
    message = str(error.value)
    assert url in message and "1.5 s" in message and "alignkit vllm-serve MODEL" in message


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
        self.answer(stand_in_generate(body) if self.path == "/generate" else {})

    def answer(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def stand_in_generate(request: dict) -> dict:
    """/generate's answer, made up from each prompt, its seed and the sample's index."""
    ids, logps = [], []
    for prompt, seed in zip(request["prompts"], request["seeds"]):
        for j in range(request["n"]):
            ids.append([len(prompt), prompt[0], seed % 1000, j])
            logps.append([-0.5 * j] * 4)
    return {"completion_ids": ids, "logps": logps}


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


def ddp_rank(rank: int, url: str, init_file: str, out: str) -> None:
    """One of two gloo processes: sync a model, sample its own prompts with its own seed, write them."""
    from alignkit.config.generation import VLLMSettings
    from alignkit.generation.server import ServerSampler

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        sampler = ServerSampler(VLLMSettings(mode="server", server_url=url, server_timeout=10), eos={2})
        sampler.sync(torch.nn.Linear(2, 2), version=1)
        prompts = [[11, 12, 13]] if rank == 0 else [[21, 22], [31]]
        got = sampler.sample(
            None, None, prompts, num_samples=2, seed=7 + rank, max_new_tokens=4, batch_size=8
        )
        Path(out, f"{rank}.json").write_text(json.dumps([got.completion_ids, got.logps]))
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_the_main_process_pushes_and_sends_every_processs_prompts(stand_in, tmp_path):
    """Two gloo processes: one weight push and one /generate (the main process's, with all three prompts
    and each process's own seeds), and each process gets back exactly what it would get alone."""
    from alignkit.config.generation import VLLMSettings
    from alignkit.generation.server import ServerSampler

    url = f"http://127.0.0.1:{stand_in.server_port}"
    args = (url, str(tmp_path / "init"), str(tmp_path))
    torch.multiprocessing.start_processes(ddp_rank, args=args, nprocs=2, start_method="spawn")
    posts = [(path, body) for method, path, body in stand_in.log if method == "POST"]
    assert [path for path, _ in posts] == ["/update_weights", "/reset_prefix_cache", "/generate"]
    assert posts[2][1]["prompts"] == [[11, 12, 13], [21, 22], [31]]
    alone = ServerSampler(VLLMSettings(mode="server", server_url=url, server_timeout=10), eos={2})
    for rank, prompts in ((0, [[11, 12, 13]]), (1, [[21, 22], [31]])):
        expected = alone.sample(None, None, prompts, num_samples=2, seed=7 + rank, max_new_tokens=4)
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == [expected.completion_ids, expected.logps]
        assert len(got[0]) == 2 * len(prompts)


def test_vllm_serve_takes_one_model_on_the_command_line(capsys):
    from alignkit.cli import main

    assert main(["vllm-serve", "--help"]) == 0
    assert "usage: alignkit vllm-serve MODEL [key=value ...]" in capsys.readouterr().out
    assert main(["vllm-serve", "model-a", "model-b"]) == 2
    assert "takes one MODEL" in capsys.readouterr().err


@needs_vllm
def test_grpo_samples_from_the_server_and_pushes_its_weights_every_step(
    server_url, peaked_llama_dir, tmp_path
):
    """generation.vllm.mode=server: a short GRPO run draws its rollouts from the server, pushing the policy's
    weights before each one (HTTP), so the server's log-probs of what it drew are the trainer's at every
    step, the updates in between (lr 3e-2) included. (Last in the module: it leaves its weights there.)"""
    from alignkit.algorithms import grpo
    from alignkit.config.generation import GenerationSettings, VLLMSettings
    from tests.conftest import train_metrics, write_prompts
    from tests.test_grpo import config

    server = VLLMSettings(mode="server", server_url=server_url, server_timeout=10)
    generation = GenerationSettings(max_new_tokens=8, backend="vllm", vllm=server)
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path, peaked_llama_dir, data, generation=generation, max_steps=3, lr=3e-2)
    grpo.train(cfg)
    metrics = train_metrics(cfg)
    assert len(metrics) == 3 and all(m["sampler/logp_diff/max"] < 1e-3 for m in metrics), metrics
