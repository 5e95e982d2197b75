"""Rollout generation speed on this machine: alignkit's lean KV-cache loop vs transformers' generate (hf) vs
a colocated vLLM engine (generation/vllm.py), for models of three sizes, in completions per second.

    bash scripts/vllm_env.sh                                   # vLLM's environment (docs/vllm.md)
    .venv-vllm/bin/python benchmarks/vllm_speed.py             # all three sizes, 3 rounds each
    .venv-vllm/bin/python benchmarks/vllm_speed.py --sizes tiny 0.1b --rounds 5
    .venv-vllm/bin/python benchmarks/vllm_speed.py --sizes 0.1b --grpo-steps 6   # and a GRPO run on each

One rollout as GRPO draws it: `--prompts` prompts of alignkit/assets/demo/pairs.jsonl x `--samples`
completions of `--max-new-tokens` tokens at most, temperature 1, no truncation, fp32. The models are
randomly initialised (no hub access here), at real shapes: `tiny` (the tests' head-size-64 Llama, 2.4M
parameters), `0.1b` (a 12-layer Llama of GPT-2-small width, ~110M) and `qwen2.5-0.5b` (Qwen2.5-0.5B's
config, ~494M), with the shipped TinyStories tokenizer's ids as prompts. EOS is never drawn on purpose
by a random model, so completions run to the limit and every backend generates the same token count.
vLLM's time includes the weight sync an RL step does before sampling (reported apart as well). Backends
alternate within a round (the first one rotates), after one warm-up call each; medians are reported.
`--grpo-steps N` also runs `alignkit grpo` for N steps on the 0.1b model with each backend at equal settings
(batch `--prompts` x G `--samples`, β 0.04, lr 1e-5, fp32) and reports each step's timings, reward and the
sampler's gap to the trainer. `--record` appends the printed lines and the JSON to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure the alignkit of this checkout, whatever is installed

TOKENIZER = REPO / "alignkit" / "assets" / "tinystories-656k"
PROMPTS = REPO / "alignkit" / "assets" / "demo" / "pairs.jsonl"
FIXTURES = REPO / "benchmarks" / ".fixture"
SIZES = {
    "tiny": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=2048)),
    "0.1b": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=12, vocab_size=32000)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
}  # fmt: skip


def build(size: str) -> Path:
    """A randomly initialised model of `size`'s shape with the TinyStories tokenizer, saved once."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = FIXTURES / f"vllm-speed-{size}"
    if (path / "config.json").exists():
        return path
    kind, shape = SIZES[size]
    config_class = LlamaConfig if kind == "llama" else Qwen2Config
    config = config_class(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=1024, **shape
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, path / name)
    return path


def measure(size: str, args) -> dict:
    from alignkit.config.generation import VLLMSettings
    from alignkit.generation.backends import ModelSampler
    from alignkit.generation.vllm import ColocatedVLLM
    from alignkit.models.load import load_causal_lm, load_tokenizer

    path = build(size)
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), pad_token_id=0)
    rows = [json.loads(line)["prompt"] for line in open(PROMPTS)][: args.prompts]
    prompt_ids = [tokenizer(r)["input_ids"] for r in rows]
    settings = VLLMSettings(cpu_kv_cache_gb=args.kv_cache_gb)
    vllm = ColocatedVLLM(str(path), model, tokenizer, settings=settings, max_model_len=512)
    samplers = {"loop": ModelSampler("loop"), "hf": ModelSampler("hf"), "vllm": vllm}
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=args.prompts * args.samples)
    sync_s = []

    def timed(name: str, seed: int) -> tuple[float, int]:
        t = time.perf_counter()
        if name == "vllm":
            vllm.sync(model, version=seed)
            sync_s.append(time.perf_counter() - t)
        out = samplers[name].sample(
            model, tokenizer, prompt_ids, num_samples=args.samples, seed=seed, **kwargs
        )
        return time.perf_counter() - t, sum(len(c) for c in out.completion_ids)

    for name in samplers:
        timed(name, -1 - len(sync_s))  # warm-up
    seconds: dict[str, list[float]] = {n: [] for n in samplers}
    tokens: dict[str, list[int]] = {n: [] for n in samplers}
    order = list(samplers)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            s, n = timed(name, r)
            seconds[name].append(s)
            tokens[name].append(n)
    completions = args.prompts * args.samples
    out = {"parameters": sum(p.numel() for p in model.parameters()), "sync_s": statistics.median(sync_s)}
    for name in samplers:
        median = statistics.median(seconds[name])
        out[name] = {
            "median_s": median,
            "completions_per_s": completions / median,
            "tokens_per_s": sum(tokens[name]) / sum(seconds[name]),
            "seconds": seconds[name],
        }
    return out


def grpo_side(backend: str, args) -> dict:
    """`alignkit grpo` for `args.grpo_steps` steps on the 0.1b model sampling with `backend` (in a process of
    its own, this interpreter): the per-step timings, rewards and sampler gap from its metrics.jsonl."""
    import subprocess

    out = FIXTURES / f"grpo-{backend}"
    command = [sys.executable, "-m", "alignkit.cli", "grpo", f"model={build('0.1b')}", f"data={PROMPTS}"]
    command += ["rewards=[{type: regex, pattern: e, mode: count}]", f"output_dir={out}", "overwrite=true"]
    command += [
        f"max_steps={args.grpo_steps}",
        f"batch_size={args.prompts}",
        f"num_generations={args.samples}",
    ]
    command += [f"generation.max_new_tokens={args.max_new_tokens}", f"generation.backend={backend}"]
    command += [f"generation.vllm.cpu_kv_cache_gb={args.kv_cache_gb}", "mixed_precision=no", "lr=1e-5"]
    command += ["progress=false", "report=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load = os.getloadavg()[0]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=3600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    keys = ("time/generation", "time/logprobs", "time/training", "time/step", "reward")
    series = {k: [round(r[k], 3) for r in rows] for k in keys}
    series["sampler/logp_diff/max"] = [r.get("sampler/logp_diff/max") for r in rows]
    return {"load_before": load, **series}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    p.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    p.add_argument(
        "--grpo-steps",
        type=int,
        default=0,
        help="also run `alignkit grpo` this many steps on the 0.1b model with each of loop and vllm",
    )
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    bf16 = "avx512_bf16" in open("/proc/cpuinfo").read()
    import vllm

    lines = [
        f"{platform.machine()} {cpu} ({'with' if bf16 else 'without'} AVX512-BF16), {os.cpu_count()} cores, torch "
        f"{torch.__version__} threads {torch.get_num_threads()}, vllm {vllm.__version__}, 1-minute load average "
        f"{os.getloadavg()[0]:.2f}; {args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} new "
        f"tokens, {args.rounds} rounds, fp32"
    ]
    print(lines[0])
    results = {}
    for size in args.sizes:
        results[size] = r = measure(size, args)
        lines.append(
            f"{size:>13} ({r['parameters'] / 1e6:.1f}M): completions/s "
            + ", ".join(f"{b} {r[b]['completions_per_s']:.2f}" for b in ("loop", "hf", "vllm"))
            + f"; vLLM weight sync {r['sync_s']:.3f} s (inside its time)"
        )
        print(lines[-1], flush=True)
    grpo = {}
    for backend in ("loop", "vllm") if args.grpo_steps else ():
        grpo[backend] = g = grpo_side(backend, args)
        later = slice(1, None)  # (the first step warms up)
        lines.append(
            f"alignkit grpo, 0.1b, {backend:>4} (load before {g['load_before']:.2f}): seconds per step after the "
            f"first: generation {g['time/generation'][later]}, log-probs {g['time/logprobs'][later]}, training "
            f"{g['time/training'][later]}, step {g['time/step'][later]}; reward {g['reward']}"
        )
        print(lines[-1], flush=True)
    lines.append(f"1-minute load average at the end {os.getloadavg()[0]:.2f}")
    print(lines[-1])
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "cpu": cpu,
        "results": results,
        "grpo": grpo,
    }
    print(json.dumps(summary))
    if args.record:
        command = ".venv-vllm/bin/python benchmarks/vllm_speed.py " + " ".join(
            a for a in sys.argv[1:] if a != "--record"
        )
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(
                f"\n## {summary['date']} — `{command.strip()}`\n\n```\n" + "\n".join(lines) + "\n```\n\n"
                f"```json\n{json.dumps(summary, indent=1)}\n```\n"
            )


if __name__ == "__main__":
    main()
