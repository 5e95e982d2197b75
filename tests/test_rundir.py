"""A run never destroys or splices another: used output_dirs, overwrite, resume fingerprints, torn
metrics lines, file permissions (issue 11, items 1 and 8)."""

import json
import os
import shutil
import stat

import pytest

from alignkit.algorithms import dpo, sft
from alignkit.cli import main
from alignkit.config.load import ConfigError
from alignkit.config.preference import DPOConfig
from alignkit.config.supervised import SFTConfig
from alignkit.training.checkpoint import run_fingerprint
from alignkit.training.rundir import claim_output_dir


def sft_rows(path, n=16):
    rows = [{"prompt": f"Tom had {i} apples.", "completion": f" He ate {i % 3} of them."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_config(tmp_path, model, **overrides):
    base = dict(
        model=str(model),
        data=sft_rows(tmp_path / "rows.jsonl"),
        output_dir=str(tmp_path / "out"),
        batch_size=4,
        max_steps=6,
        save_steps=2,
        save_total_limit=2,
        max_length=48,
        max_prompt_length=24,
        lr=1e-3,
        progress=False,
        mixed_precision="no",
    )
    base.update(overrides)
    return SFTConfig(**base)


def steps(cfg):
    return [json.loads(line)["step"] for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]


def test_a_fresh_run_into_a_used_output_dir_is_refused_and_overwrite_replaces_it(tmp_path, tiny_model_dir):
    first = sft_config(tmp_path, tiny_model_dir)
    sft.train(first)
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    # resume=false into the finished run: refused, naming what is there and the two ways on; nothing touched
    second = sft_config(tmp_path, tiny_model_dir, max_steps=3, lr=2e-3)
    with pytest.raises(ConfigError) as refused:
        sft.train(second)
    message = str(refused.value)
    assert f"output_dir {out} already holds a run" in message
    assert "config.yaml" in message and "metrics.jsonl" in message and "final/" in message
    assert "checkpoints/ (checkpoint-2, checkpoint-4)" in message
    assert "resume=true" in message and "overwrite=true" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    # overwrite=true: the old run's files go first, so no old checkpoint survives to be resumed later
    second.overwrite = True
    sft.train(second)
    assert steps(second) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert "lr: 0.002" in (out / "config.yaml").read_text()
    assert (out / "cache").is_dir()  # content-keyed: kept


def test_resume_under_other_training_settings_names_them(tmp_path, tiny_model_dir):
    cfg = sft_config(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    sft.train(cfg)
    config_yaml = (tmp_path / "out" / "config.yaml").read_text()
    changed = sft_config(tmp_path, tiny_model_dir, max_steps=6, resume=True, lr=5e-4, batch_size=2, seed=7)
    with pytest.raises(ValueError) as err:
        sft.train(changed)
    message = str(err.value)
    for key in ("lr (checkpoint: 0.001, now: 0.0005)", "batch_size (checkpoint: 4, now: 2)", "seed"):
        assert key in message
    assert "max_steps" not in message  # extending a run is what resume is for
    assert (tmp_path / "out" / "config.yaml").read_text() == config_yaml  # refused before anything is written

    # the same settings, a longer run, other logging: resumes and continues the step count
    extended = sft_config(tmp_path, tiny_model_dir, max_steps=6, resume=True, logging_steps=1, save_steps=3)
    sft.train(extended)
    assert steps(extended) == [1, 2, 3, 4, 5, 6]


def test_fingerprint_keeps_what_shapes_training_only():
    a = run_fingerprint(SFTConfig(model="m", data="d"))
    b = run_fingerprint(
        SFTConfig(model="m", data="d", output_dir="x", max_steps=9, epochs=3, save_steps=1, progress=False)
    )
    assert a == b
    assert "lora.r" in a and "lr" in a and "output_dir" not in a
    other = SFTConfig(model="m", data="d")
    other.lora.r = 4
    assert run_fingerprint(other) == {**a, "lora.r": 4}


def test_resume_with_nothing_to_resume_starts_and_contradictions_are_refused(tmp_path):
    claim_output_dir(tmp_path / "empty", resume=True)  # nothing there: just starts
    with pytest.raises(ConfigError, match="contradict"):
        claim_output_dir(tmp_path, resume=True, overwrite=True)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("lr: 1")
    (tmp_path / "metrics.jsonl").write_text("")
    claim_output_dir(tmp_path)  # a run that stopped before its first step (bad data): nothing to lose
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"holds a run \(config.yaml, metrics.jsonl, checkpoints/ \(none"):
        claim_output_dir(tmp_path)
    # resume=true with a run there but no checkpoint would restart it from step 0 over its files
    with pytest.raises(
        ConfigError, match="resume=true, but .* holds a run with no checkpoint to continue from"
    ):
        claim_output_dir(tmp_path, resume=True)
    claim_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's files go


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, tiny_model_dir, capsys):
    cfg = sft_config(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    sft.train(cfg)
    metrics = tmp_path / "out" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3]) + '\n{"step": 4, "split": "tra')  # killed mid-write
    shutil.rmtree(tmp_path / "out" / "final")
    sft.train(sft_config(tmp_path, tiny_model_dir, max_steps=4, save_steps=2, resume=True))
    assert f"{metrics}:4: truncated last line skipped" in capsys.readouterr().out
    assert steps(cfg) == [1, 2, 3, 4]


def test_saved_weights_follow_the_umask(tmp_path, tiny_model_dir):
    old = os.umask(0o022)
    try:
        sft.train(sft_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    files = [*out.glob("final/*.safetensors"), *out.glob("checkpoints/*/*.safetensors")]
    assert files
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}
    assert stat.S_IMODE((out / "config.yaml").stat().st_mode) == 0o644


def test_the_reference_cache_follows_the_umask(tmp_path, tiny_model_dir):
    """The precomputed reference log-probs (cache/reference-*.safetensors) are written as every other file
    is, 0666 & ~umask: safetensors alone writes 0600. umask 002 (a shared group), so that a fixed 0644
    would fail too."""
    rows = [
        {"prompt": f"Tom had {i} apples.", "chosen": " He ate one.", "rejected": " No."} for i in range(8)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DPOConfig(
        model=str(tiny_model_dir),
        data=str(tmp_path / "pairs.jsonl"),
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        batch_size=4,
        max_steps=1,
        save_steps=0,
        max_length=32,
        max_prompt_length=16,
        progress=False,
    )
    old = os.umask(0o002)
    try:
        dpo.train(cfg)
    finally:
        os.umask(old)
    caches = list((tmp_path / "cache").rglob("reference-*.safetensors"))
    assert caches
    assert {stat.S_IMODE(f.stat().st_mode) for f in caches} == {0o664}
    assert stat.S_IMODE((tmp_path / "out" / "config.yaml").stat().st_mode) == 0o664


def test_demo_refuses_a_used_output_dir(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_report.json").write_text("{}")
    assert main(["demo", f"output_dir={out}", "progress=false"]) == 1
    err = capsys.readouterr().err
    assert "already holds a run (demo_report.json)" in err and "overwrite=true" in err
    assert len(err.strip().splitlines()) == 1


def test_a_checkpoint_that_predates_a_setting_resumes_at_its_default(tmp_path, tiny_model_dir):
    """A run checkpointed before a setting existed (its fingerprint lacks the key) resumes when the setting
    is at its default, as the older code ran; at any other value the change is named and refused."""
    sft.train(sft_config(tmp_path, tiny_model_dir, max_steps=4, save_steps=2))
    for checkpoint in (tmp_path / "out" / "checkpoints").iterdir():  # as an older alignkit wrote them
        state = json.loads((checkpoint / "state.json").read_text())
        del state["fingerprint"]["chat_template_kwargs"], state["fingerprint"]["system_prompt"]
        (checkpoint / "state.json").write_text(json.dumps(state))

    newer = sft_config(tmp_path, tiny_model_dir, max_steps=6, resume=True, system_prompt="Be brief.")
    with pytest.raises(ValueError, match=r"system_prompt \(checkpoint: absent, now: \"Be brief.\"\)") as err:
        sft.train(newer)
    assert "chat_template_kwargs" not in str(err.value)  # at its default: no change

    upgraded = sft_config(tmp_path, tiny_model_dir, max_steps=6, resume=True)
    sft.train(upgraded)
    assert steps(upgraded) == [1, 2, 3, 4, 5, 6]
