"""alignkit generate (best-of-n): the argmax choice, the summary by hand, n = 1, resume after a real kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from alignkit.config.generation import GenerationSettings
from alignkit.config.load import ConfigError
from alignkit.config.tools import GenerateConfig
from alignkit.generation.sampling import sample_seed
from alignkit.inference.best_of_n import choose_best, read_finished, run, sample_and_score, summarize
from alignkit.rewards import RewardSet
from tests.conftest import REPO, write_prompts


def test_choose_best_takes_the_argmax_ties_to_the_lowest_index_and_never_nan():
    assert choose_best([1.0, 3.0, 3.0, 2.0]) == 1
    assert choose_best([math.nan, 0.5, -1.0]) == 1
    assert choose_best([-2.0, math.nan, -1.0]) == 2
    assert choose_best([math.nan, math.nan]) == 0
    assert choose_best([-1.0]) == 0


def _record(index: int, totals: list[float], chosen: int, icdpo: bool = False) -> dict:
    candidates = [{"text": "", "completion_ids": [], "scores": {}, "total": t} for t in totals]
    if icdpo:
        for c in candidates:
            c["icdpo"] = 0.0
    return {"index": index, "prompt": "", "candidates": candidates, "chosen": chosen, "chosen_text": ""}


def test_summary_by_hand():
    """Totals [1, 3, 2] (chosen 1) and [0, 0, 4] (chosen 2): chosen [3, 4] -> mean 3.5, s.e. = sample std
    0.7071 / sqrt 2 = 0.5; mean candidate [2, 4/3] -> 5/3; first [1, 0] -> 0.5; gain over mean
    [1, 8/3] -> 11/6, s.e. |8/3 - 1| / 2 = 5/6; best of 1 = first, best of 2: [3, 0] -> 1.5."""
    s = summarize([_record(0, [1.0, 3.0, 2.0], 1), _record(1, [0.0, 0.0, 4.0], 2)])
    assert (s["prompts"], s["n"]) == (2, 3)
    assert s["chosen"] == pytest.approx({"mean": 3.5, "stderr": 0.5})
    assert s["mean_candidate"]["mean"] == pytest.approx(5 / 3)
    assert s["first_candidate"]["mean"] == pytest.approx(0.5)
    assert s["gain_over_mean"] == pytest.approx({"mean": 11 / 6, "stderr": 5 / 6})
    assert s["gain_over_first"] == pytest.approx({"mean": 3.0, "stderr": 1.0})
    assert list(s["best_of_k"]) == ["1", "2"]
    assert s["best_of_k"]["1"]["mean"] == pytest.approx(0.5)
    assert s["best_of_k"]["2"]["mean"] == pytest.approx(1.5)
    assert "agreement" not in s
    # Chosen by ICDPO: prompt 0 kept 2 (not the best), prompt 1 kept the best; [1, 1, 1] has 3 tied best.
    s = summarize([_record(0, [1.0, 3.0, 2.0], 2, True), _record(1, [1.0, 1.0, 1.0], 0, True)])
    assert s["agreement"] == pytest.approx({"mean": 0.5, "stderr": 0.5})
    assert s["chance_agreement"] == pytest.approx((1 / 3 + 1) / 2)


def _config(model_dir, tmp_path, name: str, **kw) -> GenerateConfig:
    defaults = dict(
        model=str(model_dir),
        prompts=write_prompts(tmp_path / "prompts.jsonl", n=6),
        rewards=[{"type": "length"}],
        n=4,
        generation=GenerationSettings(max_new_tokens=8),
        chunk_prompts=2,
        output_dir=str(tmp_path / name),
        progress=False,
    )
    return GenerateConfig(**{**defaults, **kw})


def _lines(cfg: GenerateConfig) -> list[dict]:
    return [json.loads(line) for line in open(f"{cfg.output_dir}/candidates.jsonl")]


def test_generate_keeps_the_argmax_of_the_reward(tiny_model_dir, tmp_path, tokenizer):
    cfg = _config(tiny_model_dir, tmp_path, "bon")
    summary = run(cfg)
    lines = _lines(cfg)
    assert [r["index"] for r in lines] == list(range(6))
    rewards = RewardSet.from_specs(cfg.rewards)
    for r in lines:
        totals = [c["total"] for c in r["candidates"]]
        assert len(totals) == 4 and r["chosen"] == totals.index(max(totals))  # first of the best
        assert r["chosen_text"] == r["candidates"][r["chosen"]]["text"]
        texts = [c["text"] for c in r["candidates"]]
        assert texts == tokenizer.batch_decode(
            [c["completion_ids"] for c in r["candidates"]], skip_special_tokens=True
        )
        assert rewards([r["prompt"]] * 4, texts).total.tolist() == totals  # the totals are the reward's
        assert [c["scores"]["length"] for c in r["candidates"]] == totals
    chosen = [r["candidates"][r["chosen"]]["total"] for r in lines]
    means = [sum(c["total"] for c in r["candidates"]) / 4 for r in lines]
    assert summary["chosen"]["mean"] == pytest.approx(sum(chosen) / 6)
    assert summary["chosen"]["mean"] >= summary["mean_candidate"]["mean"] == pytest.approx(sum(means) / 6)
    assert summary["chosen"]["mean"] > summary["mean_candidate"]["mean"]  # lengths differ on some prompt
    assert json.loads(open(f"{cfg.output_dir}/summary.json").read())["chosen"] == summary["chosen"]
    assert "  backend: loop\n" in open(f"{cfg.output_dir}/config.yaml").read()  # auto, as resolved

    # The function the iterative methods call gives chunk 1 (prompts 2, 3) back exactly.
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    chunk = sample_and_score(
        model,
        tokenizer,
        [r["prompt"] for r in lines[2:4]],
        None,  # the tokenizer's encoding, as the command's
        rewards=rewards,
        n=4,
        max_new_tokens=8,
        seed=sample_seed(0, 1) % 2**63,
        batch_size=cfg.generation.batch_size,
        backend="loop",  # what the run resolved auto to
    )
    for c, r in zip(chunk, lines[2:4]):
        assert c.completion_ids == [x["completion_ids"] for x in r["candidates"]]
        assert c.totals == [x["total"] for x in r["candidates"]]


def test_n_equal_1_is_plain_sampling(tiny_model_dir, tmp_path):
    summary = run(_config(tiny_model_dir, tmp_path, "n1", n=1, num_prompts=4))
    assert summary["prompts"] == 4 and summary["n"] == 1
    for key in ("mean_candidate", "first_candidate", "best"):
        assert summary[key] == summary["chosen"]
    assert summary["gain_over_mean"] == {"mean": 0.0, "stderr": 0.0}
    assert list(summary["best_of_k"]) == ["1"]


SLOW_RUN = """
import json, sys, time
import alignkit.inference.best_of_n as best_of_n

append_jsonl = best_of_n.append_jsonl
def stalling(f, record, **kwargs):
    if record["index"] == 3:  # prompt 3 sampled and scored, not yet written: the test kills the run here
        time.sleep(300)
    append_jsonl(f, record, **kwargs)
best_of_n.append_jsonl = stalling
from alignkit.config.load import build_config
best_of_n.run(build_config(best_of_n.GenerateConfig, json.loads(sys.argv[1])))
print("finished")
"""


def test_a_killed_run_resumes_to_the_uninterrupted_file_scoring_nothing_twice(
    tiny_model_dir, tmp_path, monkeypatch
):
    """chunk_prompts=2, and the kill lands after prompt 2's line, inside chunk 1 (prompts 2, 3): the
    resumed run samples chunk 1 again and must give prompt 3 the uninterrupted run's candidates, scoring
    prompts 3-5 only; a torn last line is dropped."""
    cfg = _config(tiny_model_dir, tmp_path, "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, json.dumps(asdict(cfg))],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    path = tmp_path / "killed" / "candidates.jsonl"
    deadline = time.time() + 120
    while not (path.exists() and path.read_text().count("\n") == 3) and proc.poll() is None:
        assert time.time() < deadline, "the run did not write three lines in 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and "finished" not in out
    with open(path, "ab") as f:  # and a line torn by a kill while it was being written
        f.write(b'{"index": 3, "prompt": "Tom went')

    scored: list[int] = []
    score_sources = RewardSet.score_sources

    def counting(self, prompts, responses, context=None):
        scored.append(len(responses))
        return score_sources(self, prompts, responses, context)

    monkeypatch.setattr(RewardSet, "score_sources", counting)
    cfg.resume = True
    resumed = run(cfg)
    assert resumed["resumed_at"] == 3
    assert sum(scored) == (6 - 3) * 4  # only the three unfinished prompts were scored

    whole = _config(tiny_model_dir, tmp_path, "whole")
    uninterrupted = run(whole)
    assert path.read_bytes() == (tmp_path / "whole" / "candidates.jsonl").read_bytes()
    assert {k: v for k, v in resumed.items() if k != "resumed_at"} == {
        k: v for k, v in uninterrupted.items() if k != "resumed_at"
    }


def test_resume_rules(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path, "rules", num_prompts=2)
    run(cfg)
    with pytest.raises(ConfigError, match="already holds a run .*candidates.jsonl.*resume=true"):
        run(cfg)
    with pytest.raises(ConfigError, match=r"other settings: n \(checkpoint: 4, now: 3\)"):
        run(_config(tiny_model_dir, tmp_path, "rules", num_prompts=2, n=3, resume=True))
    more = run(_config(tiny_model_dir, tmp_path, "rules", num_prompts=4, resume=True))  # more prompts: fine
    assert (more["prompts"], more["resumed_at"]) == (4, 2)


def test_read_finished_refuses_a_bad_line_before_the_last(tmp_path):
    path = tmp_path / "candidates.jsonl"
    good = json.dumps(_record(0, [1.0], 0))
    path.write_text(good + "\n" + "{not json\n" + json.dumps(_record(1, [1.0], 0)) + "\n")
    with pytest.raises(ValueError, match=r"candidates.jsonl:2: not JSON; delete the file"):
        read_finished(path)
    path.write_text(good + "\n" + json.dumps(_record(5, [1.0], 0)) + "\n")
    with pytest.raises(ValueError, match=r":2: index 5, expected 1"):
        read_finished(path)
    path.write_text(good + "\n" + good[:10])
    assert len(read_finished(path)) == 1 and path.read_text() == good + "\n"  # the torn line is cut off


@pytest.mark.parametrize("name", ["best_of_n.yaml", "icdpo.yaml"])
def test_the_example_configs_load_and_name_shipped_files(name):
    from alignkit.config.load import load_config
    from alignkit.inference.best_of_n import check_config

    cfg = load_config(GenerateConfig, str(REPO / "examples" / "inference" / name))
    check_config(cfg)
    for path in (cfg.model, cfg.prompts, cfg.demos):
        assert not path or (REPO / path).exists(), path
    assert cfg.method == {"best_of_n.yaml": "reward", "icdpo.yaml": "icdpo"}[name]
