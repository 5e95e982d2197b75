"""Runs one alignkit command (as `alignkit <command> key=value ...` would) and, on every process, writes
that process's trained parameters to DUMP_DIR/rank<r>.safetensors when `fit` returns, so a test can check
that the processes agree and equal a 1-process run. Online commands also write what each process
sampled and trained on to DUMP_DIR/rank<r>.online.json: per step, its rollout's scores, completion
lengths and EOS flags, (GRPO) the advantages of every micro-batch the loss saw, (online-dpo) its pair statistics, and (PPO) every whitening's
entries before and after and what the logged figures are taken from.

    torchrun --standalone --nproc_per_node 2 tests/distributed/driver.py DUMP_DIR dpo model=... ...
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

import alignkit.algorithms.dpo
import alignkit.algorithms.grpo
import alignkit.algorithms.kto
import alignkit.algorithms.listwise
import alignkit.algorithms.online_dpo
import alignkit.algorithms.ppo
import alignkit.algorithms.reward_model
import alignkit.algorithms.sft
import alignkit.training.loop
from alignkit.cli import main
from alignkit.losses.policy_losses import POLICY_LOSSES

ALGORITHMS = (
    alignkit.algorithms.dpo,
    alignkit.algorithms.kto,
    alignkit.algorithms.listwise,
    alignkit.algorithms.reward_model,
    alignkit.algorithms.sft,
)


def dump(accelerator, prepared, dump_dir: Path) -> None:
    weights = {
        name: p.detach().contiguous().cpu()
        for name, p in accelerator.unwrap_model(prepared).named_parameters()
        if p.requires_grad
    }
    dump_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(dump_dir / f"rank{accelerator.process_index}.safetensors"))


def dumping(fit, dump_dir: Path):
    def fit_and_dump(cfg, accelerator, *args, **kwargs):
        prepared, last = fit(cfg, accelerator, *args, **kwargs)
        dump(accelerator, prepared, dump_dir)
        return prepared, last

    return fit_and_dump


ONLINE: dict[str, list] = {"rollouts": [], "advantages": [], "whitened": [], "shaped": [], "pairs": []}


def recording_rollouts(collect):
    def collect_and_record(*args, **kwargs):
        rollout = collect(*args, **kwargs)
        if kwargs.get("update_rewards", True):  # (a training rollout, not an eval)
            ONLINE["rollouts"].append(
                {
                    "scores": rollout.scores.tolist(),
                    "lengths": rollout.completion_lengths,
                    "ended": rollout.ended.tolist(),
                    "reward_stats": rollout.reward_stats,
                    "ids": rollout.completion_ids(),
                    "guide_trace": [float(f) for f in rollout.sampler_details.get("guide_trace", [])],
                    "tokens_changed": [float(n) for n in rollout.sampler_details.get("tokens_changed", [])],
                }
            )
        return rollout

    return collect_and_record


def recording_advantages(policy_loss):
    def record(logps, old_logps, advantages, mask, **kwargs):
        ONLINE["advantages"].append(advantages.tolist())
        return policy_loss(logps, old_logps, advantages, mask, **kwargs)

    return record


def recording_whitening(whiten):
    """PPO's whiten, recording each call's masked entries before and after (rewards, then advantages)."""

    def record(values, mask, **kwargs):
        out = whiten(values, mask, **kwargs)
        on = mask.bool()
        shift_mean = kwargs.get("shift_mean", True)
        ONLINE["whitened"].append(
            {"values": values[on].tolist(), "whitened": out[on].tolist(), "shift_mean": shift_mean}
        )
        return out

    return record


def recording_shaped(shape_rewards):
    """PPO's shape_rewards, recording what its logged figures are taken from: this process's scores (after
    the EOS penalty), and the returns and the critic's values on its completion tokens."""

    def record(cfg, rollout, kl_coef, **kwargs):
        shaped = shape_rewards(cfg, rollout, kl_coef, **kwargs)
        on = rollout.completion_mask.bool()
        ONLINE["shaped"].append(
            {
                "scores": shaped["scores"].tolist(),
                "returns": shaped["returns"][on].tolist(),
                "values": rollout.old_values[on].tolist(),
            }
        )
        return shaped

    return record


def recording_pairs(build_pairs):
    """online-dpo's build_pairs, recording each step's pair statistics of this process's table (not the
    weight-0 stand-in pair of a process that has none)."""

    def record(scores, **kwargs):
        pairs, stats = build_pairs(scores, **kwargs)
        if "completions" in kwargs:
            ONLINE["pairs"].append({"stats": stats.as_dict(), "gaps": [p.gap for p in pairs]})
        return pairs, stats

    return record


def dumping_before_save(save_final, dump_dir: Path):
    """For the online loops, which own their loop: dump when the final model is saved."""

    def dump_and_save(accelerator, prepared, *args, **kwargs):
        dump(accelerator, prepared, dump_dir)
        path = dump_dir / f"rank{accelerator.process_index}.online.json"
        path.write_text(json.dumps(ONLINE))
        return save_final(accelerator, prepared, *args, **kwargs)

    return dump_and_save


def run(dump_dir: str, argv: list[str]) -> int:
    for module in ALGORITHMS:
        module.fit = dumping(module.fit, Path(dump_dir))
    for online in (alignkit.algorithms.grpo, alignkit.algorithms.ppo, alignkit.algorithms.online_dpo):
        online.save_final = dumping_before_save(online.save_final, Path(dump_dir))
    alignkit.training.loop.collect = recording_rollouts(alignkit.training.loop.collect)
    registered = dict(POLICY_LOSSES)  # (grpo.py calls the policy loss it finds there by name)
    for name, spec in registered.items():
        POLICY_LOSSES[name] = dataclasses.replace(spec, fn=recording_advantages(spec.fn))
    online_dpo = alignkit.algorithms.online_dpo
    online_dpo.build_pairs = recording_pairs(online_dpo.build_pairs)
    ppo = alignkit.algorithms.ppo
    ppo.whiten = recording_whitening(ppo.whiten)
    ppo.shape_rewards = recording_shaped(ppo.shape_rewards)
    try:
        return main(argv)
    finally:  # a run in the test's own process leaves the registry as it found it
        POLICY_LOSSES.update(registered)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
