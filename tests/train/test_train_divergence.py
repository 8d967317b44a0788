"""A diverging run stops the same way on every optimizer path: the plain base optimizer, the exact SAM (two passes)
and the one-pass SAM (``sam="onepass"``), with the same TrainingError, before anything is saved or exported.

What stops a run (timm_remem.train.guards.StepGuard): a non-finite loss in the first pass or in SAM's perturbed pass,
a non-finite gradient with a finite loss (the exact SAM used to skip such steps forever without a GradScaler and
finish "normally" with the diverged model, exporting it), and weights that became non-finite in the update. What does
not: a step that a GradScaler skips because the scaled gradient overflowed (float16 amp).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from train_cases import VIT

import timm_remem.train.recipes as recipes
from timm_remem.errors import TrainingError
from timm_remem.sam import SAM
from timm_remem.train import finetune_teacher
from timm_remem.train.guards import StepGuard
from timm_remem.train.loop import train_step

pytestmark = pytest.mark.usefixtures("one_thread")

PATHS = [
    pytest.param(dict(rho=0.0), id="plain"),
    pytest.param(dict(rho=0.05), id="exact-sam"),
    pytest.param(dict(rho=0.05, sam="onepass"), id="onepass-sam"),
]
RUN = dict(VIT, epochs=1, limit_train_batches=3, save_at=[1])  # one export, after epoch 1: never reached here
TAIL = r"; training stopped and nothing was saved after it \(no checkpoint was written yet\)\. Resume with gradient"


def _stops(tmp_path: Path, match: str, **settings) -> None:
    """The run raises exactly TrainingError with ``match``; no export, no training checkpoint, no lock left."""
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=f"(?s){match}") as info:
        finetune_teacher(**RUN, **settings, output=str(out))
    assert type(info.value) is TrainingError
    assert not (out / "checkpoints").exists(), "a diverged model was exported"
    assert not any((out / "train-state").glob("step-*")), "a training checkpoint was written after the failure"
    assert not (out / "metrics.jsonl").exists()


def _nan_from_call(monkeypatch, first: int, last: int | None = None) -> None:
    """The recipe's task loss is NaN on its calls ``first``..``last`` (1-based; ``last=None``: from then on)."""
    real, calls = recipes.task_loss, {"n": 0}

    def task_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        bad = calls["n"] >= first and (last is None or calls["n"] <= last)
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(recipes, "task_loss", task_loss)


@pytest.mark.parametrize("path", PATHS)
def test_a_diverging_learning_rate_stops_on_the_nan_loss(tmp_path, path):
    """AdamW at lr=1e6: the first update blows the weights up, the next loss is NaN."""
    _stops(tmp_path, r"the training loss became nan at epoch 1, step 2" + TAIL, lr=1e6, **path)


@pytest.mark.parametrize("path", PATHS)
def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run(tmp_path, path):
    """SGD at lr=1e6: at step 2 the loss is about 1e10 (finite) and its gradient NaN. The plain optimizers would
    apply it (NaN weights); the exact SAM used to skip this step and every later one, then export the model."""
    _stops(tmp_path, r"the gradient of the training loss became non-finite at epoch 1, step 2 while the loss was "
                     r"finite \(\d\.\d+e\+\d+\): the run has diverged \(only a GradScaler, under float16 amp, skips "
                     r"such a step\)" + TAIL, lr=1e6, optimizer="sgd", **path)


@pytest.mark.parametrize("path", PATHS)
def test_weights_that_overflow_in_the_update_stop_the_run(tmp_path, monkeypatch, path):
    """A finite loss (1e15 times the task loss) and a finite gradient, but SGD at lr=1e28 moves the weights past
    float32's range."""
    real = recipes.task_loss
    monkeypatch.setattr(recipes, "task_loss", lambda *args, **kwargs: real(*args, **kwargs) * 1e15)
    _stops(tmp_path, r"the weights became non-finite in the optimizer step at epoch 1, step 1 \(the loss was "
                     r"2\.\d+e\+15 and its gradient finite: the update overflowed\)" + TAIL,
           lr=1e28, optimizer="sgd", **path)


@pytest.mark.parametrize("path", PATHS)
def test_a_loss_that_becomes_nan_stops_the_run(tmp_path, monkeypatch, path):
    """The loss of step 2 (its first pass) is NaN: the task loss's 2nd call, or its 3rd with the exact SAM's two
    passes per step."""
    _nan_from_call(monkeypatch, first=3 if path.get("sam", "exact") == "exact" and path["rho"] else 2)
    _stops(tmp_path, r"the training loss became nan at epoch 1, step 2" + TAIL, **path)


def test_a_nan_loss_in_sams_perturbed_pass_alone_stops_the_run(tmp_path, monkeypatch):
    """Only the perturbed pass of step 2 (the task loss's 4th call) is NaN; the first pass of every step is fine.
    Its NaN gradient made SAM skip the step, so the run would otherwise have gone on."""
    _nan_from_call(monkeypatch, first=4, last=4)
    _stops(tmp_path, r"the training loss became nan in SAM's perturbed pass at epoch 1, step 2" + TAIL, rho=0.05)


# ------------------------------------------------------------------------------ what is not a failure: AMP skips

def _overflowing_step(optimizer_for, scale: float) -> tuple[torch.optim.Optimizer, float, bool]:
    """One train_step, guarded as fit guards it, whose loss is finite and whose gradient overflows once scaled.

    Returns the optimizer, the step's loss and whether the weights are unchanged."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = optimizer_for(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    x, y = torch.randn(8, 4) * 100, torch.randint(0, 3, (8,))

    def compute(x_, target, idx, teacher_logits):
        logits = model(x_)
        return torch.nn.functional.cross_entropy(logits, target), logits, None

    before = [p.detach().clone() for p in model.parameters()]
    value, _ = train_step(model, optimizer, compute, x, y, torch.arange(8), scaler=scaler,
                          autocast=contextlib.nullcontext, clip_grad=None,
                          check=StepGuard(epoch=0, step=0, state_dir=None))
    assert scaler.get_scale() < scale, "the scaler did not see the overflow"
    return optimizer, value, all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("optimizer_for", [
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1), id="exact-sam"),
    pytest.param(lambda m: torch.optim.SGD(m.parameters(), lr=0.1), id="plain"),
])
def test_a_step_a_grad_scaler_skips_for_overflow_is_not_a_failure(optimizer_for):
    """The loss is finite, the scaled gradient (scale 2^127) overflows: the step is skipped, the weights are unchanged,
    the scale backs off, and nothing is raised."""
    optimizer, value, unchanged = _overflowing_step(optimizer_for, 2.0**127)
    assert math.isfinite(value) and unchanged
    if isinstance(optimizer, SAM):
        assert optimizer.skipped_steps == 1 and optimizer.stats.skipped
