"""User errors at the command line are one line and a non-zero exit, never a traceback (issue 11, item 3)."""

import json
import shutil

import pytest
import torch

from alignkit.cli import main
from alignkit.models.load import load_tokenizer


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "Hi.", "completion": " Hello."}) + "\n")
    return str(path)


def one_line_error(capsys, argv, code=1) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_a_model_path_that_does_not_exist(tmp_path, rows, capsys):
    line = one_line_error(
        capsys, ["sft", f"model={tmp_path}/nope", f"data={rows}", f"output_dir={tmp_path}/o"]
    )
    assert line == (
        f"alignkit sft: error: model: {tmp_path}/nope does not exist (expected a local model folder or a "
        "Hugging Face hub name such as org/name)"
    )
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_folder_with_only_pickle_weights(tmp_path, rows, tiny_model_dir, capsys):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    line = one_line_error(capsys, ["dpo", f"model={pickled}", f"data={rows}", f"output_dir={tmp_path}/o"])
    assert (
        f"model: {pickled} holds only pickle weights (pytorch_model.bin); alignkit loads safetensors only"
        in line
    )
    assert "save_pretrained(path, safe_serialization=True)" in line


def test_a_model_folder_without_tokenizer_files_does_not_blame_sentencepiece(
    tmp_path, tiny_model_dir, capsys
):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare / "config.json")
    shutil.copy(tiny_model_dir / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_tokenizer(str(bare))
    assert "has no tokenizer files" in str(err.value) and "tokenizer=PATH" in str(err.value)
    assert "sentencepiece" not in str(err.value)


def test_ctrl_c_during_set_up_is_one_line_and_exit_130(tmp_path, rows, tiny_model_dir, capsys, monkeypatch):
    import alignkit.algorithms.sft as sft

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "load_policy", interrupted)  # Ctrl-C while the model loads
    argv = ["sft", f"model={tiny_model_dir}", f"data={rows}", f"output_dir={tmp_path}/o", "progress=false"]
    assert one_line_error(capsys, argv, code=130) == "alignkit sft: interrupted"


def test_ctrl_c_in_the_training_loop_saves_the_step_and_exits_130(
    tmp_path, rows, tiny_model_dir, capsys, monkeypatch
):
    """The loop finishes the step Ctrl-C arrived in, saves it, says where, and raises RunInterrupted (a
    KeyboardInterrupt, as the Python API leaves it); the CLI turns that into 130 without a second message."""
    import alignkit.training.loop as loop
    from tests.conftest import ctrl_c_at

    ctrl_c_at(monkeypatch, loop, "optimizer_step", 2)  # Ctrl-C in step 2
    out = tmp_path / "o"
    argv = [
        "sft",
        f"model={tiny_model_dir}",
        f"data={rows}",
        f"output_dir={out}",
        "max_steps=4",
        "batch_size=1",
        "progress=false",
    ]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert (
        f"interrupted after step 2: checkpoint written to {out / 'checkpoints' / 'checkpoint-2'}"
        in captured.out
    )
    assert "alignkit sft: interrupted" not in captured.err and "Traceback" not in captured.err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]


def test_eval_names_the_missing_model_and_keeps_an_earlier_report(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Once"}\n')
    args = ["eval", f"prompts={prompts}", f"output_dir={tmp_path}"]
    line = one_line_error(capsys, [*args, f"base_model={tmp_path}/base", f"model={tiny_model_dir}"])
    assert line.startswith(f"alignkit eval: error: base_model: {tmp_path}/base does not exist")
    (tmp_path / "eval_report.json").write_text("{}")
    line = one_line_error(capsys, [*args, f"base_model={tiny_model_dir}", f"model={tiny_model_dir}"])
    assert (
        f"output_dir {tmp_path} already holds a run (eval_report.json)" in line and "overwrite=true" in line
    )
