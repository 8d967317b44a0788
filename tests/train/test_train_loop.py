"""The training loop's own checks (timm_remem.train.loop and .guards) against references written here.

The errors users meet are rows of the bad-input matrix (tests/bad_input/test_bad_train.py); here: the label check
against a plain Python loop, evaluation against a hand-written cross-entropy, and where the teacher-logit check sits
in a SAM step.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from train_cases import CNN

from timm_remem.errors import TrainingError
from timm_remem.train import distill_student
from timm_remem.train.guards import TeacherWatch, check_labels
from timm_remem.train.loop import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_problem(labels: list[int], num_classes: int) -> str | None:
    if not labels:
        return "is empty (0 samples)"
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not bad:
        return None
    value = min(labels) if min(labels) < 0 else max(labels)
    return f"holds label {value}, outside 0..{num_classes - 1}"


@pytest.mark.parametrize("seed", range(20))
def test_check_labels_matches_a_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes = int(torch.randint(1, 12, (1,), generator=g))
    n = int(torch.randint(0, 9, (1,), generator=g))
    y = torch.randint(-2, num_classes + 2, (n,), generator=g)
    assert check_labels(y, num_classes) == _reference_problem(y.tolist(), num_classes)


def test_soft_targets_and_unknown_class_counts_are_not_checked():
    assert check_labels(torch.full((3, 5), 0.2), 5) is None  # mixup-style soft targets
    assert check_labels(torch.tensor([7, 99]), None) is None  # a model that does not say its class count


def test_evaluate_matches_a_hand_written_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    batches = [(torch.randn(5, 6), torch.randint(0, 4, (5,)), torch.arange(5)),
               (torch.randn(3, 6), torch.randint(0, 4, (3,)), torch.arange(3))]
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y, _ in batches:
            for row, label in zip(model(x).tolist(), y.tolist(), strict=True):
                log_z = math.log(sum(math.exp(v) for v in row))
                total += log_z - row[label]
                correct += int(max(range(4), key=lambda k: row[k]) == label)
                count += 1
    loss, acc = evaluate(model, batches, torch.device("cpu"))
    assert loss == pytest.approx(total / count, rel=1e-6) and acc == correct / count


def test_the_teacher_watch_checks_the_first_pass_only():
    """SAM's second pass gets the first pass's teacher logits back: they were checked already."""
    calls = []

    def compute(x, target, idx, teacher_logits):
        calls.append(teacher_logits is None)
        return x.sum(), x, teacher_logits if teacher_logits is not None else torch.tensor([1.0, float("inf")])

    watch = TeacherWatch(compute)
    _, _, first = watch(torch.ones(2), None, None, None)
    assert watch.take() is False and watch.take() is True
    watch(torch.ones(2), None, None, first)  # the second pass: same (bad) logits, no new verdict
    assert watch.take() is True and calls == [True, False]


class _NaNAfter(torch.nn.Module):
    def __init__(self, after: int):
        super().__init__()
        self.net = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=10)
        self.pretrained_cfg, self.num_classes, self.after, self.calls = self.net.pretrained_cfg, 10, after, 0

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.calls > self.after else out


def test_nan_teacher_logits_under_sam_stop_at_the_first_pass_of_that_step(tmp_path):
    teacher = _NaNAfter(after=2)  # the validation pass, then step 1; step 2's teacher logits are NaN
    with pytest.raises(TrainingError, match=r"teacher's logits hold NaN or inf at epoch 1, step 2"):
        distill_student(**CNN, epochs=1, limit_train_batches=3, rho=0.05, cache_teacher=False, save_at=[],
                        output=str(tmp_path), teacher_model=teacher)
    assert teacher.calls == 3  # SAM's second pass of step 2 never ran


def test_metrics_are_never_appended_through_a_symlink(tmp_path):
    from timm_remem.errors import ConfigError
    from timm_remem.train.loop import write_metrics

    path = tmp_path / "metrics.jsonl"
    write_metrics(path, {"epoch": 1})
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    path.unlink()
    path.symlink_to(outside)  # planted mid-run
    with pytest.raises(ConfigError, match="became a symlink during the run"):
        write_metrics(path, {"epoch": 2})
    assert outside.read_text() == "precious\n"
