"""The command table: one entry per command, each resolving to a config class and a runner."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from alignkit.cli import main
from alignkit.commands import COMMANDS, resolve
from tests.conftest import REPO


def test_every_command_resolves_to_a_config_dataclass_and_a_runner():
    for name, command in COMMANDS.items():
        assert dataclasses.is_dataclass(command.config_class), name
        assert callable(command.run), name
        if command.trains:  # a training command writes a run folder: its config has output_dir
            assert "output_dir" in {f.name for f in dataclasses.fields(command.config_class)}, name


def test_resolve_names_a_module_attribute():
    assert resolve("alignkit.commands:COMMANDS") is COMMANDS


def test_help_lists_every_command_without_importing_torch(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)
    code = "import sys, alignkit.cli; alignkit.cli.main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().endswith("False")  # `alignkit --help` answers without loading the ML stack


def test_the_sweep_accepts_only_commands_that_train_a_language_model():
    sweepable = {n for n, c in COMMANDS.items() if c.trains and c.language_model}
    assert {"sft", "dpo", "grpo", "ppo", "online-dpo", "iterative-dpo", "distill"} <= sweepable
    assert not sweepable & {"eval", "score", "report", "demo", "generate", "sweep", "diffusion-dpo", "reward"}
