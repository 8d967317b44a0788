"""Tests for timm_remem.distill.cache: TeacherLogitCache and precompute_teacher_logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_refs import (
    CallCounter,
    vit,
)

from timm_remem.distill import (
    RememDistillationTask,
    Teacher,
    TeacherLogitCache,
    precompute_teacher_logits,
)
from timm_remem.errors import ConfigError


def test_cached_logits_are_returned_without_calling_the_teacher():
    model = vit()
    teacher = Teacher(model, cache=TeacherLogitCache(8))
    counter = CallCounter(model)
    x, idx = torch.randn(4, 3, 32, 32), torch.tensor([5, 1, 7, 2])
    first = teacher(x, indices=idx)
    second = teacher(torch.zeros_like(x), indices=idx)  # different pixels: only the cache can give `first` back
    assert counter.calls == 1
    assert torch.equal(first, second)
    third = teacher(x[:2], indices=torch.tensor([0, 5]))  # index 0 missing -> teacher runs
    assert counter.calls == 2 and third.shape == (2, 10)


def test_precomputed_cache_serves_task_without_teacher_calls():
    student, model = vit(), vit()
    teacher = Teacher(model, student)
    xs, idx = torch.randn(6, 3, 32, 32), torch.arange(6)
    batches = [(xs[:3], torch.zeros(3), idx[:3]), (xs[3:], torch.zeros(3), idx[3:])]
    cache = precompute_teacher_logits(teacher, batches, TeacherLogitCache(6), progress=False)
    assert cache.complete and teacher.cache is cache
    counter = CallCounter(model)
    task = RememDistillationTask(student, teacher, verbose=False)
    out = task(xs[3:], torch.randint(0, 10, (3,)), indices=idx[3:])
    assert counter.calls == 0
    with torch.no_grad():
        np.testing.assert_allclose(out["teacher_logits"].numpy(), model(xs[3:]).numpy(), rtol=1e-5, atol=1e-6)


def test_cache_rejects_out_of_range_indices():
    with pytest.raises(ConfigError, match=r"sample indices must lie in \[0, 4\)"):
        TeacherLogitCache(4).put(torch.tensor([4]), torch.zeros(1, 3))
