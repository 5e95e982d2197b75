"""Atomic, resumable checkpoints of named state: models, optimizers, schedulers and any other object with
`state_dict()` / `load_state_dict()` (a loss's running mean, a reward normaliser, a KL controller, a
sampling-seed counter).

A checkpoint is written to a temporary folder and renamed into place, so a run killed while writing one
never picks it up; the newest `keep` are kept. With the data order fixed by the seed (`runtime.DataOrder`),
the named state, the RNG states and the step are everything a resumed run needs to repeat the
uninterrupted one exactly.

Layout of checkpoints/checkpoint-<step>/:
    <name>.safetensors   a model's trainable parameters (frozen ones come from the model's own weights)
    <name>.pt            any other object's state_dict (loaded with weights_only=True)
    rng.pt               torch (and CUDA) generator states
    state.json           the step, Python's random state, and the caller's JSON `extra`
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class Frozen:
    """A state_dict taken earlier, saved as if it were the object's current state (e.g. a loop's state
    as it was at the end of the last finished step, when a Ctrl-C arrives in the middle of the next)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _is_model(obj) -> bool:
    return isinstance(obj, torch.nn.Module)


def _sorted_checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


class Checkpointer:
    """Writes and restores checkpoints of named state under output_dir/checkpoints (see module doc)."""

    def __init__(self, output_dir: Path, keep: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = max(keep, 1)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = _sorted_checkpoints(self.root)
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
        (tmp / "state.json").write_text(json.dumps(record))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _sorted_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, state: dict[str, object]) -> dict:
        """Restore every object of `state` from checkpoint `path` (and the RNG states); returns the
        checkpoint's state.json record (its `step` and the `extra` it was saved with).

        An object the checkpoint lacks, or a model weight the model lacks, is an error: a checkpoint of
        another run or another model must not be half-loaded.
        """
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
