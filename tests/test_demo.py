"""The embedded demo end to end: DPO on the shipped AI-feedback pairs must make stories happier."""

import json

from alignkit.cli import main


def test_demo_raises_sentiment_and_keeps_text_fluent(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", f"output_dir={out}", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "| vader |" in printed and "base-model perplexity" in printed

    report = json.loads((out / "demo_report.json").read_text())
    base, aligned = report["base"], report["aligned"]
    sentiment = report["rewards"]["vader"]
    assert report["settings"]["num_samples"] == 4
    assert sentiment["aligned"]["mean"] - sentiment["base"]["mean"] >= 0.2
    # fluency: the base model finds the aligned samples no less likely than its own
    assert aligned["base_model_perplexity"] <= base["base_model_perplexity"] * 1.05
    # what was evaluated is what was shipped: the saved model folder
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "demo_report.md").read_text() in printed
    # it ends with the HTML report (curves, the before/after table) and says where it is
    assert printed.rstrip().endswith(f"report written to {out / 'report.html'}")
    page = (out / "report.html").read_text()
    assert (
        f'<td class="num">{sentiment["base"]["mean"]:+.3f} ± {sentiment["base"]["stderr"]:.3f}</td>' in page
    )
    assert "finished (final model saved)" in page
