"""Bad input to the distillation losses: temperatures they cannot compute accurately are refused, naming the value
and the accepted range.

Rows of docs/bad-input.md ("Distillation losses: the temperature range"). Inside the range the losses are within 1e-3
of an exact reference (tests/distill/test_distill_accuracy.py); outside it float32 cannot hold them to that accuracy,
so they refuse rather than return a number that looks fine.
"""

from __future__ import annotations

import pytest
import torch

from timm_remem import ConfigError
from timm_remem.distill import DistillationLoss, dist_loss, kd_loss

S, T = torch.randn(4, 10), torch.randn(4, 10)
RANGE = r"0\.0001 <= temperature <= 1e\+08"


def _raises(error, match, call, *args, **kwargs):
    with pytest.raises(error, match=f"(?s){match}") as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


CASES = [
    pytest.param(lambda: kd_loss(S, T, temperature=1e9), ConfigError,
                 rf"temperature=1e\+09 is outside the range the distillation losses compute accurately in "
                 rf"float32, {RANGE}; use a temperature in that range", id="kd-temperature-too-large"),
    pytest.param(lambda: kd_loss(S, T, temperature=1e-5), ConfigError,
                 rf"temperature=1e-05 is outside the range .*{RANGE}", id="kd-temperature-too-small"),
    pytest.param(lambda: dist_loss(S, T, temperature=1e12), ConfigError,
                 rf"temperature=1e\+12 is outside the range .*{RANGE}", id="dist-temperature-too-large"),
    pytest.param(lambda: DistillationLoss("kd", temperature=2e8), ConfigError,
                 rf"temperature=2e\+08 is outside the range .*{RANGE}", id="loss-temperature-too-large"),
]


@pytest.mark.parametrize(("call", "error", "match"), CASES)
def test_distill_rejects(call, error, match):
    _raises(error, match, call)

