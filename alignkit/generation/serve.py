"""`alignkit vllm-serve MODEL`: one vLLM engine served over HTTP to trainers that sample from it and push
their weights to it (their side: generation.server.ServerSampler; docs/vllm.md, "Server mode").

The engine is built as the colocated one is (generation.vllm): prompts as token ids, every sampling field
set by `sampling_params`, the model's generation_config.json kept out, the drawn tokens' processed
log-probs; plus the NCCL weight-sync extension on its workers (generation.weight_sync). Endpoints, JSON
in and out unless said:

- GET /health: {"status": "ok", "model", "max_model_len", "dtype", "world_size"}; 503 {"status":
  "loading"} while the engine loads (the port is bound first, so a port in use fails at once).
- POST /generate: {"prompts": [[id, ...]], "seeds": [one per prompt], "n", "eos": [ids], "settings":
  {"max_new_tokens", "temperature", "top_k", "top_p"}} -> {"completion_ids", "logps"}, prompt-major, n per
  prompt, exactly as `ColocatedVLLM.sample` returns them (`completions`).
- POST /update_weights: a weight stream (generation.wire; chunked, application/octet-stream), collected
  whole, then reloaded in place in one pass -> {"tensors": count}. One in-process worker only.
- POST /init_communicator {"host", "port", "world_size", "client_device_uuid"}, /update_named_param
  {"name", "dtype", "shape"}, /close_communicator: the NCCL transport. The first two answer before the
  workers act, since the workers then wait for the trainer's side of the rendezvous or the broadcast.
- POST /reset_prefix_cache -> {"reset": true}.

One request uses the engine at a time (a lock); /health answers at once. Errors answer {"error": message}:
400 for a request that is wrong (a prompt longer than max_model_len, a bad field), 500 otherwise.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from alignkit.generation.vllm import (
    SAMPLER_ENGINE_ARGS,
    SAMPLING_KEYS,
    completions,
    engine_memory,
    import_vllm,
    sampling_params,
    vllm_refusal,
)
from alignkit.generation.weight_sync import NCCL_EXTENSION
from alignkit.generation.wire import ChunkedBody, read_weight_frames


class BadRequest(ValueError):
    """A request the server refuses as it is (answered 400)."""


class Served:
    """The engine (None while it loads), the lock that lets one request use it at a time, and its
    description for /health."""

    def __init__(self, cfg):
        self.cfg, self.llm, self.on_cpu, self.lock = cfg, None, True, threading.Lock()
        self.sync_error: str | None = None
        """What went wrong in the workers after an NCCL request was answered (reported at the next one)."""

    def health(self) -> tuple[int, dict]:
        if self.llm is None:
            return 503, {"status": "loading", "model": self.cfg.model}
        model_config = self.llm.llm_engine.model_config
        return 200, {
            "status": "ok",
            "model": self.cfg.model,
            "max_model_len": model_config.max_model_len,
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "world_size": self.cfg.tensor_parallel_size,
        }


def build_engine(cfg):
    """The vLLM engine `cfg` (a VLLMServeConfig) describes, and whether it runs on a CPU."""
    from transformers import AutoConfig

    vllm = import_vllm()
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    model_config = AutoConfig.from_pretrained(
        cfg.model, revision=cfg.revision or None, trust_remote_code=cfg.trust_remote_code
    )
    reason = vllm_refusal(model_config, on_cpu=on_cpu)
    if reason:
        raise ValueError(f"vllm-serve {cfg.model}: {reason}")
    memory = engine_memory(on_cpu, cpu_kv_cache_gb=cfg.cpu_kv_cache_gb, gpu_share=cfg.gpu_memory_utilization)
    optional = {"max_num_seqs": cfg.max_num_seqs} if cfg.max_num_seqs else {}
    llm = vllm.LLM(
        model=cfg.model,
        tokenizer=cfg.tokenizer or cfg.model,
        revision=cfg.revision or None,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len or None,
        enforce_eager=cfg.enforce_eager or on_cpu,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enable_prefix_caching=cfg.enable_prefix_caching,
        **SAMPLER_ENGINE_ARGS,
        seed=cfg.seed,
        trust_remote_code=cfg.trust_remote_code,
        worker_extension_cls=NCCL_EXTENSION,
        **memory,
        **optional,
    )
    return llm, on_cpu


def generate(served: Served, request: dict) -> dict:
    """/generate: the completions and sampler log-probs of the request's prompts."""
    prompts, seeds, n = request.get("prompts"), request.get("seeds"), request.get("n", 1)
    if not isinstance(prompts, list) or not all(
        isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts
    ):
        raise BadRequest("'prompts' must be a list of token-id lists, none empty")
    if not isinstance(seeds, list) or len(seeds) != len(prompts):
        raise BadRequest(f"'seeds' must be a list of one seed per prompt ({len(prompts)})")
    if not isinstance(n, int) or n < 1:
        raise BadRequest(f"'n' must be a positive integer, got {n!r}")
    settings = request.get("settings", {})
    if not isinstance(settings, dict) or "max_new_tokens" not in settings:
        raise BadRequest("'settings' must give max_new_tokens")
    if unknown := sorted(set(settings) - SAMPLING_KEYS):
        raise BadRequest(f"'settings' has {', '.join(unknown)}; it takes {', '.join(sorted(SAMPLING_KEYS))}")
    eos = set(request.get("eos", []))
    vllm = import_vllm()
    params = [sampling_params(vllm, num_samples=n, seed=seed, eos=eos, **settings) for seed in seeds]
    with served.lock:
        outputs = served.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sampled = completions(outputs)
    return {"completion_ids": sampled.completion_ids, "logps": sampled.logps}


def update_weights(served: Served, read) -> dict:
    """/update_weights: the streamed weights, collected whole, then reloaded into the engine in place
    (read before anything is refused, so that the trainer, still sending, gets the answer)."""
    tensors = read_weight_frames(read)
    worker = getattr(served.llm.llm_engine.model_executor, "driver_worker", None)
    if worker is None:
        raise BadRequest(
            "weight_transport=http loads weights in the server's own process, which needs one worker "
            "there (tensor_parallel_size=1, VLLM_ENABLE_V1_MULTIPROCESSING=0); use weight_transport=nccl"
        )
    with served.lock:
        worker.worker.model_runner.reload_weights(weights_iterator=iter(tensors))
    return {"tensors": len(tensors)}


class Handler(BaseHTTPRequestHandler):
    """The endpoints (module docstring); `self.server.served` is the engine's state."""

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet: the server reports what it does itself, not one line per request."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") == "/health":
            self.reply(*self.server.served.health())
        else:
            self.reply(404, {"error": f"no GET {self.path}; GET /health"})

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        served, path = self.server.served, self.path.rstrip("/")
        routes = {
            "/generate": lambda: generate(served, self.json()),
            "/update_weights": lambda: update_weights(served, self.body_reader()),
            "/reset_prefix_cache": lambda: self.reset_prefix_cache(served),
            "/init_communicator": lambda: self.nccl(served, "open_weight_group", group_args(self.json())),
            "/update_named_param": lambda: self.nccl(served, "receive_weight", weight_args(self.json())),
            "/close_communicator": lambda: self.nccl(served, "close_weight_group", ()),
        }
        if path not in routes:
            self.reply(404, {"error": f"no POST {self.path}; endpoints: {', '.join(routes)}"})
            return
        if served.llm is None:
            self.reply(503, {"error": "the engine is still loading; wait for GET /health to say ok"})
            return
        start = time.perf_counter()
        try:
            answer = routes[path]()
        except Exception as e:
            if not is_request_error(e):  # the engine failed: say so in the server's log too
                traceback.print_exc()
            self.reply(400 if is_request_error(e) else 500, {"error": f"{type(e).__name__}: {e}"})
            return
        if answer is not None:  # (the NCCL requests answer before their work)
            self.reply(200, answer)
        if path in ("/generate", "/update_weights"):
            took = time.perf_counter() - start
            print(f"vllm-serve: {path} {describe(path, answer)} in {took:.2f} s", file=sys.stderr, flush=True)

    def json(self) -> dict:
        payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object")
        return payload

    def body_reader(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return ChunkedBody(self.rfile).read
        left = [int(self.headers.get("Content-Length") or 0)]

        def read(n: int) -> bytes:
            data = self.rfile.read(min(n, left[0])) if left[0] else b""
            left[0] -= len(data)
            return data

        return read

    def reset_prefix_cache(self, served: Served) -> dict:
        self.json()
        with served.lock:
            served.llm.reset_prefix_cache()
        return {"reset": True}

    def nccl(self, served: Served, method: str, args: tuple) -> None:
        """An NCCL transport request: answered first, then run on every worker (which then waits for the
        trainer's side); a failure there is reported at the next NCCL request."""
        if served.on_cpu:
            raise BadRequest(
                "weight_transport=nccl needs the server on GPUs; this one runs on a CPU: use http"
            )
        if method == "receive_weight" and served.sync_error:
            raise RuntimeError(f"the weight-sync group failed earlier: {served.sync_error}")
        with served.lock:
            self.reply(200, {"accepted": method})
            try:
                served.llm.collective_rpc(method, args=args)
                if method == "open_weight_group":  # a new group: an old failure no longer matters
                    served.sync_error = None
            except Exception as e:
                traceback.print_exc()
                served.sync_error = f"{method}: {type(e).__name__}: {e}"


def group_args(request: dict) -> tuple:
    """/init_communicator's fields as `NCCLWorkerExtension.open_weight_group` takes them."""
    host, port, world_size = str(request["host"]), int(request["port"]), int(request["world_size"])
    return host, port, world_size, str(request.get("client_device_uuid", ""))


def weight_args(request: dict) -> tuple:
    """/update_named_param's fields as `NCCLWorkerExtension.receive_weight` takes them."""
    dtype = str(request["dtype"])
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise BadRequest(f"'dtype' must name a torch dtype (float32, bfloat16, ...), got {dtype!r}")
    return str(request["name"]), dtype, [int(size) for size in request["shape"]]


def is_request_error(e: Exception) -> bool:
    """Whether `e` says the request was wrong (400), not the server: a malformed field, or one vLLM
    refuses (its VLLMClientError, e.g. a prompt longer than max_model_len; a ValueError in older vLLMs)."""
    request_errors = (ValueError, TypeError, KeyError)
    return isinstance(e, request_errors) or any(k.__name__ == "VLLMClientError" for k in type(e).__mro__)


def describe(path: str, answer: dict | None) -> str:
    """A log line's summary of an answer."""
    if path == "/generate" and answer:
        return f"{len(answer['completion_ids'])} completions"
    return f"{answer.get('tensors', 0)} tensors" if answer else ""


def run(cfg) -> None:
    """`alignkit vllm-serve`: bind the port, load the engine, serve until Ctrl-C (or SIGTERM)."""
    if not cfg.model:
        raise ValueError("vllm-serve needs a model: `alignkit vllm-serve MODEL [key=value ...]`")
    served = Served(cfg)
    httpd = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    httpd.daemon_threads = True
    httpd.served = served
    threading.Thread(target=httpd.serve_forever, name="vllm-serve-http", daemon=True).start()
    url = f"http://{cfg.host}:{cfg.port}"
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as Ctrl-C: close the port, exit 0
    try:
        print(
            f"vllm-serve: loading {cfg.model}; {url}/health answers 'loading' until it is ready",
            file=sys.stderr,
        )
        llm, served.on_cpu = build_engine(cfg)
        served.llm = llm  # (last: a request that sees the engine sees where it runs)
        print(f"vllm-serve: serving {cfg.model} at {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        threading.Event().wait()
    finally:
        httpd.shutdown()
        httpd.server_close()
        signal.signal(signal.SIGTERM, previous)
