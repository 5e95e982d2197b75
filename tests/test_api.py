"""The public Python API: alignkit.train / run / evaluate / make_config run the CLI's commands with the same
configs and checks, and a Ctrl-C inside them stops as Python code stops (a KeyboardInterrupt)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import alignkit
from alignkit.cli import main
from alignkit.config.load import ConfigError
from alignkit.training.loop import RunInterrupted
from tests.conftest import REPO, ctrl_c_at

SFT = REPO / "examples" / "sft.jsonl"


def settings(tiny_model_dir, out) -> dict:
    return {"model": str(tiny_model_dir), "data": str(SFT), "output_dir": str(out), "max_steps": 3}


def lines(out) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and "/s" not in k} for r in records]


def test_train_equals_the_cli_and_returns_the_model_and_last_metrics(tmp_path, tiny_model_dir):
    result = alignkit.train("sft", **settings(tiny_model_dir, tmp_path / "api"), progress=False)
    argv = [f"{k}={v}" for k, v in settings(tiny_model_dir, tmp_path / "cli").items()]
    assert main(["sft", *argv, "progress=false"]) == 0
    assert lines(tmp_path / "api") == lines(tmp_path / "cli")  # the same run, number for number
    assert result.model == tmp_path / "api" / "final" and (result.model / "config.json").is_file()
    last = [r for r in lines(tmp_path / "api") if r["split"] == "train"][-1]
    assert result.metrics["step"] == 3 and result.metrics["loss"] == last["loss"]
    assert result.command == "sft" and result.output_dir == tmp_path / "api"


def test_a_config_from_an_object_a_dict_or_yaml_with_overrides(tmp_path):
    cfg = alignkit.DPOConfig(beta=0.3)
    made = alignkit.make_config("dpo", cfg, lr=1e-5, lora={"enabled": True}, **{"lora.r": 4})
    assert (made.beta, made.lr, made.lora.enabled, made.lora.r) == (0.3, 1e-5, True, 4)
    assert (cfg.lr, cfg.lora.enabled) != (1e-5, True)  # the caller's object is not changed
    assert alignkit.make_config("dpo", {"beta": 0.2, "lora": {"r": 2}}).lora.r == 2
    path = tmp_path / "dpo.yaml"
    path.write_text("beta: 0.4\nlora:\n  r: 3\n")
    from_file = alignkit.make_config("dpo", path, beta=0.5)
    assert (from_file.beta, from_file.lora.r) == (0.5, 3)  # the keyword wins over the file


def test_bad_input_is_refused_as_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="betta.*Did you mean 'beta'"):
        alignkit.make_config("dpo", betta=0.1)
    with pytest.raises(ConfigError, match="beta"):
        alignkit.make_config("grpo", beta=-1.0)  # the ranges are checked
    with pytest.raises(ValueError, match="unknown command 'dop'. Did you mean 'dpo'"):
        alignkit.train("dop")
    with pytest.raises(ValueError, match=r"'eval' trains no model: call alignkit.run\('eval'"):
        alignkit.train("eval")
    with pytest.raises(ConfigError, match="expected a DPOConfig"):
        alignkit.make_config("dpo", alignkit.SFTConfig())


def test_ctrl_c_inside_train_raises_keyboard_interrupt_and_resume_finishes(
    tmp_path, tiny_model_dir, monkeypatch
):
    import alignkit.training.loop as loop

    real = ctrl_c_at(monkeypatch, loop, "optimizer_step", 2)  # Ctrl-C in step 2
    run = settings(tiny_model_dir, tmp_path / "o") | {"save_steps": 0, "progress": False}
    with pytest.raises(KeyboardInterrupt) as stopped:  # not SystemExit: a notebook keeps its kernel
        alignkit.train("sft", **run)
    assert isinstance(stopped.value, RunInterrupted) and stopped.value.step == 2
    monkeypatch.setattr(loop, "optimizer_step", real)
    assert alignkit.train("sft", **run, resume=True).metrics["step"] == 3


def test_run_returns_what_a_command_produces(tmp_path):
    out = tmp_path / "scored.jsonl"
    summary = alignkit.run(
        "score",
        REPO / "examples" / "rewards.yaml",
        data=str(REPO / "examples" / "responses.jsonl"),
        output=str(out),
    )
    assert summary["rows"] == len(out.read_text().splitlines()) == 8  # score's summary, rows scored


def test_import_alignkit_loads_no_ml_stack():
    code = "import sys, alignkit; alignkit.make_config; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "False"
