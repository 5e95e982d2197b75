"""Atomic, resumable checkpoints of named state: models, optimizers, schedulers and any other object with
`state_dict()` / `load_state_dict()` (a loss's running mean, a reward normaliser, a KL controller, a
sampling-seed counter).

A checkpoint is written to a temporary folder and renamed into place, so a run killed while writing one
never picks it up; the newest `keep` are kept. With the data order fixed by the seed (`training.order.DataOrder`),
the named state, the RNG states and the step are everything a resumed run needs to repeat the
uninterrupted one exactly.

Layout of checkpoints/checkpoint-<step>/:
    <name>.safetensors   a model's trainable parameters (frozen ones come from the model's own weights)
    <name>.pt            any other object's state_dict (loaded with weights_only=True)
    rng.pt               torch (and CUDA) generator states
    state.json           the step, Python's random state, the run's fingerprint and the caller's JSON `extra`

The fingerprint (`run_fingerprint`) is every setting that shapes what is trained (model, data, loss and its
parameters, learning rate, batch sizes, seed, ...), read from the run's output_dir/config.yaml (which
`training.setup.start_run` writes), so that resuming under different ones is an error naming them, not a run
spliced from two; every loop that checkpoints through a Checkpointer gets this without doing anything.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.config.load import config_to_dict, load_yaml
from alignkit.io import follow_umask

# Settings that do not change what a run trains: where and how often it writes, how long it runs (a resumed
# run may extend max_steps or epochs), the progress bar and memory-only knobs. Everything else is in the
# fingerprint; a new setting is in it unless named here. (generation.batch_size is in it: the loop and hf
# samplers draw each completion's random numbers by its place in a batch, so it shapes the samples.)
NOT_FINGERPRINTED = frozenset(
    {
        "output_dir",
        "cache_dir",
        "resume",
        "overwrite",
        "progress",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "max_steps",
        "epochs",
        "logprob_chunk_size",
        "gradient_checkpointing",
        "on_bad_rows",
        "report",
        "report_to",
        "alarms",  # they watch the run and may stop it; a resume may change them (e.g. to go on after a stop)
        # where and how a vLLM sampler runs, not what it draws: a resume may move it (another server, more
        # memory, another weight transport)
        "generation.vllm.mode",
        "generation.vllm.server_url",
        "generation.vllm.server_timeout",
        "generation.vllm.gpu_memory_utilization",
        "generation.vllm.cpu_kv_cache_gb",
        "generation.vllm.max_model_len",
        "generation.vllm.enforce_eager",
        "generation.vllm.weight_transport",
        "generation.vllm.weight_chunk_mb",
        "generation.vllm.nccl_port",
    }
)


def run_fingerprint(cfg) -> dict:
    """{dotted key: value} of every setting that shapes training (see NOT_FINGERPRINTED), of a config or of
    its mapping as config.yaml holds it."""
    flat: dict = {}

    def walk(mapping: dict, prefix: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict) and value and prefix + key not in NOT_FINGERPRINTED:
                walk(value, f"{prefix}{key}.")
            elif prefix + key not in NOT_FINGERPRINTED:
                flat[prefix + key] = value

    walk(cfg if isinstance(cfg, dict) else config_to_dict(cfg), "")
    return json.loads(json.dumps(flat))  # as it reads back from state.json (tuples become lists)


def default_fingerprint(cfg) -> dict:
    """The fingerprint of `cfg`'s config class at its defaults: what a setting newer than a checkpoint is
    taken to have been when the checkpoint was written."""
    return run_fingerprint(type(cfg)())


def fingerprint_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """'key (checkpoint: A, now: B)' for every setting that differs between two fingerprints.

    A setting the checkpoint predates (absent from `saved`, written before the setting existed) is no
    change when its current value is its default in `defaults` (`default_fingerprint`): the older code ran
    as the default does. At any other value it is one, reported as 'checkpoint: absent'."""
    defaults = defaults or {}
    keys = [*saved, *(k for k in current if k not in saved)]
    missing = object()

    def shown(fingerprint: dict, k: str) -> str:
        return json.dumps(fingerprint[k]) if k in fingerprint else "absent"

    return [
        f"{k} (checkpoint: {shown(saved, k)}, now: {shown(current, k)})"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
        and not (k not in saved and k in defaults and current[k] == defaults[k])
    ]


def saved_fingerprint(output_dir: Path) -> dict | None:
    """The fingerprint of the run whose resolved config is output_dir/config.yaml (None without one)."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return None
    return run_fingerprint(load_yaml(path.read_text()) or {})


def check_fingerprint(path: Path, current: dict | None, defaults: dict | None = None) -> None:
    """ValueError naming the differing settings when checkpoint `path` was written under other settings
    that shape training than `current` (checkpoints without a fingerprint, and current=None, pass);
    `defaults`: see `fingerprint_differences`."""
    saved = json.loads((Path(path) / "state.json").read_text()).get("fingerprint")
    if saved is None or current is None:
        return
    differences = fingerprint_differences(saved, current, defaults)
    if differences:
        raise ValueError(
            f"{path} was written with other settings than this run's: {'; '.join(differences)}. Resume "
            "with the run's own settings (its config.yaml), or start a new run in another output_dir "
            "(or overwrite=true to replace this one)"
        )


class Frozen:
    """A state_dict taken earlier, saved as if it were the object's current state (e.g. a loop's state
    as it was at the end of the last finished step, when a Ctrl-C arrives in the middle of the next)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _is_model(obj) -> bool:
    return isinstance(obj, torch.nn.Module)


def sorted_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint-<step> folders under `root`, oldest first."""
    return sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


class Checkpointer:
    """Writes and restores checkpoints of named state under output_dir/checkpoints (see module doc)."""

    def __init__(self, output_dir: Path, keep: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = max(keep, 1)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = sorted_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, object], extra: dict | None = None) -> Path:
        """Write checkpoint-<step> holding every object of `state` under its name; returns its folder."""
        final = self.root / f"checkpoint-{step}"
        tmp = self.root / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, obj in state.items():
            if _is_model(obj):
                trainable = {
                    n: p.detach().contiguous().cpu() for n, p in obj.named_parameters() if p.requires_grad
                }
                save_file(trainable, str(tmp / f"{name}.safetensors"))
            else:
                torch.save(obj.state_dict(), tmp / f"{name}.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        record = {"step": step, "python_random": random.getstate(), **(extra or {})}
        fingerprint = saved_fingerprint(self.root.parent)  # the run's config.yaml, written by start_run
        if fingerprint is not None:
            record["fingerprint"] = fingerprint
        (tmp / "state.json").write_text(json.dumps(record))
        follow_umask(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, state: dict[str, object], *, defaults: dict | None = None) -> dict:
        """Restore every object of `state` from checkpoint `path` (and the RNG states); returns the
        checkpoint's state.json record (its `step` and the `extra` it was saved with).

        An object the checkpoint lacks (unless it says `optional_in_checkpoint`), a model weight the model lacks,
        or settings that shape training other than this run's fingerprint, is an error: a checkpoint of another
        run or model must not be half-loaded.
        `defaults` (the run's `default_fingerprint`) lets a checkpoint that predates a setting resume at
        that setting's default.
        """
        check_fingerprint(path, saved_fingerprint(self.root.parent), defaults)
        for name, obj in state.items():
            if _is_model(obj):
                file = path / f"{name}.safetensors"
                if not file.exists():
                    raise ValueError(
                        f"{path}: checkpoint has no '{name}' weights; written by another command?"
                    )
                weights = load_file(str(file))
                params = dict(obj.named_parameters())
                missing = [n for n in weights if n not in params]
                if missing:
                    raise ValueError(
                        f"{path}: checkpoint has weights the model lacks (e.g. {missing[0]}); wrong model?"
                    )
                with torch.no_grad():
                    for n, value in weights.items():
                        params[n].copy_(value)
            else:
                file = path / f"{name}.pt"
                if not file.exists() and getattr(obj, "optional_in_checkpoint", False):
                    continue  # state a checkpoint may predate (the alarms' history): it starts afresh
                if not file.exists():
                    raise ValueError(f"{path}: checkpoint has no '{name}' state; written by another command?")
                obj.load_state_dict(torch.load(file, weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        record = json.loads((path / "state.json").read_text())
        version, internal, gauss = record["python_random"]
        random.setstate((version, tuple(internal), gauss))
        return record
