"""The start and end of every run: the accelerator (precision, process group, CPU DDP over gloo), the run folder
and its trackers, the final save, and gathering rows from every process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.config.base import MIXED_PRECISION, TrainConfig
from alignkit.models.compat import reset_accelerator_state
from alignkit.training.checkpoint import default_fingerprint
from alignkit.training.tracking import check_report_to, finish_trackers, start_trackers


def native_bf16() -> bool:
    """Whether this machine computes bf16 in hardware: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX. Elsewhere (e.g. AMD Zen 3, most laptops) bf16 is emulated and slower than fp32, often ~10x."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_mixed_precision(setting: str) -> str:
    """The accelerate mixed-precision mode for `mixed_precision`: auto is what an `accelerate launch`
    config asks for, else bf16 where the device computes it natively, else no (fp32). An explicit bf16 on
    a CPU that emulates it warns, naming the flag."""
    if setting not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision '{setting}' is not one of {', '.join(MIXED_PRECISION)}")
    if setting == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "")  # set by `accelerate launch` configs
        if launcher in ("no", "bf16", "fp16"):
            return launcher
        return "bf16" if native_bf16() else "no"
    if setting == "bf16" and not torch.cuda.is_available() and not native_bf16():
        warnings.warn(
            "mixed_precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated here and a step "
            "can take ~10x longer than in fp32; use mixed_precision=auto (fp32 on this CPU)",
            stacklevel=2,
        )
    return setting


def distributed_cpu() -> bool:
    """Launched as several processes on a machine without CUDA: they must join one gloo process group
    (accelerate's `cpu=True`), or each would think it is the only one."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's PartialState (process index, main process, barriers) for a command that runs several
    trainings in one process (sDPO's stages, iterative DPO's rounds), joined as `make_accelerator` joins."""
    from accelerate import PartialState

    return PartialState(cpu=distributed_cpu())


def make_accelerator(cfg: TrainConfig):
    """An accelerate Accelerator for the config (mixed precision, seeding, `report_to` trackers).

    Launched as several processes (`torchrun`, `accelerate launch`) on a machine without CUDA, the
    processes join one gloo process group (accelerate's `cpu=True`); without it each process would
    train alone on the same rows.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # mixed precision; a process that runs several trainings (a notebook, sDPO's stages, the tests) starts
    # each from a fresh one. The distributed PartialState (the process group) is kept.
    reset_accelerator_state()
    tracked = check_report_to(cfg.report_to)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=distributed_cpu(),
        log_with=cfg.report_to if tracked else None,
        project_dir=cfg.output_dir if tracked else None,
    )
    set_seed(cfg.seed)
    return accelerator


def start_run(cfg: TrainConfig, *, check_sources: Callable | None = None):
    """(accelerator, log, output_dir) for a training command; the resolved config is saved first.

    Before anything loads: the settings are range-checked, the model folders checked (`check_sources(cfg)`,
    default `models.check_run_sources`; a diffusion pipeline has other folders), and output_dir claimed
    (`claim_run_dir`). `log` prints on the main process only.
    """
    from alignkit.config.load import save_config, validate
    from alignkit.models.load import check_run_sources

    validate(cfg)
    (check_sources or check_run_sources)(cfg)
    accelerator = make_accelerator(cfg)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    output_dir = Path(cfg.output_dir)
    claim_run_dir(cfg, accelerator)
    if accelerator.is_main_process:
        save_config(cfg, output_dir)
    start_trackers(accelerator, cfg)
    return accelerator, log, output_dir


def claim_run_dir(cfg: TrainConfig, accelerator) -> None:
    """A fresh run never destroys or splices another: output_dir holding a run is an error unless
    resume=true (under the same settings: the checkpoint's fingerprint) or overwrite=true (the main
    process deletes that run's files first). See alignkit.training.rundir."""
    from alignkit.training.checkpoint import run_fingerprint
    from alignkit.training.rundir import claim_output_dir

    claim_output_dir(
        cfg.output_dir,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        fingerprint=run_fingerprint(cfg),
        defaults=default_fingerprint(cfg),
        remove=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()


def gather_rows(accelerator, x: torch.Tensor) -> torch.Tensor:
    """`x`'s rows from every process, concatenated in rank order (the first dimension may differ between
    processes), on `x`'s device and in its dtype; `x` itself on one process. Every process gets the same
    tensor, so statistics taken over it are the whole step's and equal on every process.

    (n, ...) on process r -> (Σ_r n_r, ...)."""
    if accelerator.num_processes == 1:
        return x
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([x.shape[0]], device=device)).tolist()
    values = x.to(device, torch.float64 if x.is_floating_point() else torch.long)  # (bool cannot be sent)
    padded = accelerator.gather(accelerator.pad_across_processes(values, dim=0))  # (W·max n, ...)
    most = max(counts)
    rows = [padded[r * most : r * most + n] for r, n in enumerate(counts)]
    return torch.cat(rows).to(x.device, x.dtype)


def gather_objects(accelerator, obj) -> list:
    """[`obj` of process 0, of process 1, ...]: a picklable object from every process, in rank order, on
    every process (`[obj]` on one process). For what is not a tensor of rows: counters whose keys differ
    between processes, pair statistics."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def save_final(accelerator, model, tokenizer, output_dir: Path, *, merge_lora: bool, log=print) -> Path:
    """Save the trained model (save_pretrained, safetensors) to output_dir/final on the main process, then
    end the run (`finish_run`: trackers closed, report written). Every training command ends here.

    model: the prepared module `fit` returned (a BatchForward around the model) or the model itself."""
    from alignkit.models.load import BatchForward, save_model

    final = Path(output_dir) / "final"
    accelerator.wait_for_everyone()
    state_dict = None
    if sharded(accelerator):  # FSDP / ZeRO-3: the full weights, gathered on every process (untested here)
        state_dict = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        inner = inner.model if isinstance(inner, BatchForward) else inner
        save_model(inner, tokenizer, final, merge_lora=merge_lora, state_dict=state_dict)
        log(f"final model saved to {final}")
    accelerator.wait_for_everyone()
    finish_run(accelerator, output_dir, log)
    return final


def finish_run(accelerator, output_dir: Path, log=print) -> None:
    """Close the run's trackers and, on the main process, write output_dir/report.html unless the run's
    saved config says report=false. A report that fails warns and returns: the saved run is never lost."""
    finish_trackers(accelerator)
    if accelerator.is_main_process:
        from alignkit.report.build import report_after_run

        report_after_run(output_dir, log)


def sharded(accelerator) -> bool:
    """Whether parameters are sharded over processes (FSDP or DeepSpeed), so the main process alone
    does not hold them."""
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
