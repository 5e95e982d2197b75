"""Sampling on token ids, on one of three backends (`config.generation.GenerationSettings.backend`):

- `sampling.py`: sampling seeded per sample, through the lean KV-cache loop (`loop`, `decode_loop.py`) or
  transformers' `generate` (`hf`);
- `vllm.py`: vLLM colocated in this process, weights copied in from the trainer before each rollout;
- `server.py`: an `alignkit vllm-serve` process the trainer samples from and pushes weights to
  (`serve.py` is that process; `weight_sync.py` how the weights travel, over HTTP or NCCL; `wire.py` the
  requests and weight frames both sides share).

`backends.py` holds the one interface the rollout calls (`Sampler`: `sync` the policy's weights, `sample`
token ids with the sampler's own log-probs) and picks the backend.
"""
