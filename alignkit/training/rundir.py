"""What a command may do with its output_dir: never destroy or splice another run.

A fresh run (resume=false) into a folder that already holds a run is refused, with what is there and the
two ways on: `resume=true` continues it (from its last checkpoint, under the same settings: see
`checkpoint.run_fingerprint`), `overwrite=true` replaces it (its files are deleted first). Only the files a
run writes are looked at and deleted (RUN_FILES); anything else in the folder, and the content-keyed cache/,
is left alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from alignkit.config.load import ConfigError
from alignkit.training.checkpoint import (
    Checkpointer,
    check_fingerprint,
    saved_fingerprint,
    sorted_checkpoints,
)

# What a training run writes into output_dir (glob patterns); the cache/ folder is keyed by content and kept.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "final",
    "stage-*",
    "round-*",
    "dropped_rows.jsonl",
    "demo_report.json",
    "demo_report.md",
    "report.html",
)


def existing_outputs(output_dir: str | Path, patterns: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """The files and folders matching `patterns` in `output_dir`."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return [path for pattern in patterns for path in sorted(root.glob(pattern))]


def _has_results(path: Path) -> bool:
    """Whether `path` holds something a run produced that would be lost: not the config alone, an empty
    metrics file or checkpoints/ folder (a run that stopped before its first step, e.g. on bad data)."""
    if path.is_symlink() or path.is_file():
        return path.name != "config.yaml" and (path.is_symlink() or path.stat().st_size > 0)
    if path.name == "checkpoints":
        return Checkpointer(path.parent, 1).latest() is not None
    if path.name.startswith("stage-"):
        return any(_has_results(p) for p in existing_outputs(path))
    if path.name.startswith("round-"):  # samples, pairs and a DPO run (iterative DPO)
        return any(path.iterdir())
    return path.is_dir() and any(path.iterdir())


def _describe(root: Path, found: list[Path]) -> str:
    names = []
    for path in found:
        if path.name == "checkpoints" and path.is_dir():
            steps = [p.name for p in sorted_checkpoints(path)]
            names.append(f"checkpoints/ ({', '.join(steps) or 'none complete'})")
        else:
            names.append(path.name + ("/" if path.is_dir() else ""))
    return ", ".join(names)


def claim_output_dir(
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    fingerprint: dict | None = None,
    defaults: dict | None = None,
    patterns: tuple[str, ...] = RUN_FILES,
    remove: bool = True,
) -> None:
    """Check that a run may write into `output_dir`, and with overwrite=true delete the run there.

    Nothing there, or nothing a run produced (a config.yaml alone: the run stopped before its first step):
    go. resume=true: go from the last checkpoint, but one written under other settings than `fingerprint`
    is an error naming them (a setting the checkpoint predates counts only at a value other than its
    default in `defaults`: `checkpoint.fingerprint_differences`), and so is a run there with no checkpoint (resuming would start it again). overwrite=true: the files of the run there are deleted first (when
    `remove`; in a multi-process run only the main process removes). Otherwise: ConfigError naming what is
    there and the ways on.
    """
    if resume and overwrite:
        raise ConfigError(
            "resume=true and overwrite=true contradict each other: continue the run, or replace it"
        )
    root = Path(output_dir)
    found = existing_outputs(root, patterns)
    if not any(_has_results(path) for path in found):
        return  # nothing to lose: the run replaces what is there
    if resume:
        latest = Checkpointer(root, 1).latest()
        if latest is None and any(p.name.startswith(("stage-", "round-")) for p in found):
            return  # a run in stages (sDPO) or rounds (iterative DPO): each resumes its own part
        if latest is None:  # resuming would start again from step 0 over the run that is there
            raise ConfigError(
                f"resume=true, but output_dir {root} holds a run with no checkpoint to continue from "
                f"({_describe(root, found)}); replace it with overwrite=true, or choose another output_dir"
            )
        check_fingerprint(latest, fingerprint, defaults)
        return
    if overwrite:
        if remove:
            for path in found:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        return
    raise ConfigError(
        f"output_dir {root} already holds a run ({_describe(root, found)}); continue it with resume=true, "
        "replace it with overwrite=true (deletes those files first), or choose another output_dir"
    )


def check_resumed_backend(output_dir: str | Path, backend: str) -> None:
    """ConfigError naming both when the run in `output_dir` (its config.yaml) sampled with another
    generation.backend than `backend`, the one the resuming run resolved: its samples would come from
    another sampler. For a run in parts (iterative DPO), whose checkpoints do not hold the sampling settings;
    one that checkpoints compares them with everything else (`checkpoint.check_fingerprint`)."""
    saved = (saved_fingerprint(Path(output_dir)) or {}).get("generation.backend")
    if saved is not None and saved != backend:
        raise ConfigError(
            f"{output_dir} was sampled with generation.backend={saved}; this run resolves it to {backend}. "
            f"Resume with generation.backend={saved}, or start a new run in another output_dir (or "
            "overwrite=true to replace this one)"
        )


def part_resume_flags(output_dir: str | Path) -> tuple[bool, bool]:
    """(resume, overwrite) for continuing one part of a run in parts (an sDPO stage, an iterative-DPO
    round): resume from the part's last checkpoint when it left one, else start the part again over whatever
    it wrote before it was cut short."""
    root = Path(output_dir)
    if Checkpointer(root, 1).latest() is not None:
        return True, False
    return False, root.exists()
