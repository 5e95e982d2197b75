"""The shared optimizer step (aggregation over micro-batches, metrics reduced once), named-state
checkpoints, and mixed precision that follows the machine."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import alignkit.training.setup as setup
from alignkit.config.base import TrainConfig
from alignkit.training.checkpoint import Checkpointer, Frozen
from alignkit.training.step import make_optimizer, optimizer_step


def token_mean_loss(model, batch):
    """Squared error summed per row, averaged over the batch's 'tokens' (row weights)."""
    per_row = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2 * batch["w"]  # (B,)
    loss = per_row.sum() / batch["w"].sum()
    return loss, {"loss": loss.detach(), "w_mean": batch["w"].float().mean()}


def test_optimizer_step_takes_the_mean_over_every_unit_of_the_step():
    """Three micro-batches of 1, 2 and 3 rows whose rows weigh w tokens: the gradient must be that of
    sum(w·err²) / sum(w) over the whole step (the token-mean), not a mean of micro-batch means; logged
    metrics are unit-weighted means over the step."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.randn(6)
    w = torch.tensor([1.0, 2.0, 3.0, 1.0, 5.0, 2.0])
    model = torch.nn.Linear(3, 1)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())

    ((reference(x).squeeze(-1) - y) ** 2 * w).sum().div(w.sum()).backward()
    expected = [p.grad.clone() for p in reference.parameters()]

    cfg = TrainConfig(lr=0.1, warmup_ratio=0.0, lr_scheduler="constant", mixed_precision="no")
    accelerator = setup.make_accelerator(cfg)  # fp32, whatever an earlier test in this process used
    optimizer, scheduler = make_optimizer(model, cfg, steps=1)
    seen = []  # the gradients the optimizer steps on
    optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]))
    splits = [slice(0, 1), slice(1, 3), slice(3, 6)]
    batches = [{"x": x[s], "y": y[s], "w": w[s]} for s in splits]
    metrics = optimizer_step(
        accelerator,
        model,
        optimizer,
        scheduler,
        micro_batches=batches,
        loss_fn=token_mean_loss,
        units=[float(w[s].sum()) for s in splits],
        max_grad_norm=0.0,
    )
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        full_loss = ((reference(x).squeeze(-1) - y) ** 2 * w).sum() / w.sum()
    assert float(metrics["loss"]) == pytest.approx(float(full_loss), rel=1e-6)
    # w_mean is a per-row mean inside each micro-batch, weighted here by tokens: sum over micro-batches
    # of mean(w_m)·units_m / total units
    by_hand = sum(float(w[s].mean() * w[s].sum()) for s in splits) / float(w.sum())
    assert float(metrics["w_mean"]) == pytest.approx(by_hand, rel=1e-6)
    norm = torch.sqrt(sum((g**2).sum() for g in expected))
    assert float(metrics["grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    assert float(metrics["lr"]) == pytest.approx(0.1)


class Counter:
    """A stand-in for loop state beyond models and optimizers (a sampling-seed counter)."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_checkpoint_saves_and_restores_named_state(tmp_path):
    torch.manual_seed(0)
    policy, value = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    value.bias.requires_grad_(False)  # frozen: not in the checkpoint
    cfg = TrainConfig(lr=0.01, warmup_ratio=0.0)
    opt_p, sched_p = make_optimizer(policy, cfg, steps=10)
    opt_v, sched_v = make_optimizer(value, cfg, steps=10)
    for opt, sched, m in ((opt_p, sched_p, policy), (opt_v, sched_v, value)):
        m(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    counter = Counter()
    counter.n = 7
    state = {"policy": policy, "value": value, "policy_opt": opt_p, "value_opt": opt_v}
    state |= {"policy_sched": sched_p, "value_sched": sched_v, "seeds": counter}
    saved = {
        k: {n: t.clone() for n, t in v.state_dict().items()}
        for k, v in (("policy", policy), ("value", value))
    }
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        path = ckpt.save(step, state, extra={"note": "x"})
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert set(torch.load(path / "value_opt.pt", weights_only=True)) == {"state", "param_groups"}

    torch.manual_seed(1)
    policy2, value2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    value2.bias.requires_grad_(False)
    opt_p2, sched_p2 = make_optimizer(policy2, cfg, steps=10)
    opt_v2, sched_v2 = make_optimizer(value2, cfg, steps=10)
    counter2 = Counter()
    restored = {"policy": policy2, "value": value2, "policy_opt": opt_p2, "value_opt": opt_v2}
    restored |= {"policy_sched": sched_p2, "value_sched": sched_v2, "seeds": counter2}
    record = ckpt.load(ckpt.latest(), restored)
    assert record["step"] == 3 and record["note"] == "x" and counter2.n == 7
    for n, t in saved["policy"].items():
        assert torch.equal(policy2.state_dict()[n], t)
    assert torch.equal(value2.weight, saved["value"]["weight"])
    assert not torch.equal(value2.bias, saved["value"]["bias"])  # frozen weights come from the model
    assert sched_p2.state_dict()["last_epoch"] == 1
    assert opt_v2.state_dict()["state"][0]["step"] == opt_v.state_dict()["state"][0]["step"]
    with pytest.raises(ValueError, match="no 'critic' state"):
        ckpt.load(ckpt.latest(), {"critic": Counter()})


def test_a_frozen_snapshot_is_what_gets_saved(tmp_path):
    counter = Counter()
    counter.n = 3
    snapshot = counter.state_dict()
    counter.n = 4  # moved by a half-finished step
    path = Checkpointer(tmp_path, keep=1).save(5, {"seeds": Frozen(snapshot)})
    assert torch.load(path / "seeds.pt", weights_only=True) == {"n": 3}
    assert json.loads((path / "state.json").read_text())["step"] == 5
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_auto_follows_the_hardware(monkeypatch, native):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(setup, "native_bf16", lambda: native)
    assert setup.resolve_mixed_precision("auto") == ("bf16" if native else "no")
    assert setup.resolve_mixed_precision("no") == "no"


def test_explicit_bf16_on_an_emulating_cpu_warns_naming_the_flag(monkeypatch):
    monkeypatch.setattr(setup, "native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match=r"mixed_precision=bf16 .* emulated .* ~10x"):
        assert setup.resolve_mixed_precision("bf16") == "bf16"
    monkeypatch.setattr(setup, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert setup.resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="mixed_precision 'fp8' is not one of auto, no, bf16, fp16"):
        setup.resolve_mixed_precision("fp8")


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert setup.native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert setup.native_bf16() is True


def test_mixed_precision_auto_takes_the_launchers_setting(monkeypatch):
    """Under `accelerate launch`, auto is what its config asked for; an explicit setting still wins."""
    monkeypatch.setattr(setup, "native_bf16", lambda: True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert setup.resolve_mixed_precision("auto") == "fp16"
    assert setup.resolve_mixed_precision("no") == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert setup.resolve_mixed_precision("auto") == "bf16"
