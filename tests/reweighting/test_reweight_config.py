"""``ReweightConfig``: a record whose parts disagree is refused, ``folded`` and ``total_factors``, older records.

References are written out by hand: the product of the folded factors and the factors of the top ``k`` blocks.
"""

from __future__ import annotations

import pytest

from timm_remem import ConfigError, ReweightConfig


def test_total_factors_multiply_folded_and_the_top_k_factors():
    config = ReweightConfig(alpha=0.5, top_k=2, factors=[0.5, 0.25], num_blocks=4, folded=[0.9, 0.8, 0.7, 0.6])
    assert config.total_factors() == pytest.approx([0.9, 0.8, 0.35, 0.15])
    assert ReweightConfig(alpha=0.5, factors=[0.5, 0.25], num_blocks=2).total_factors() == [0.5, 0.25]


def test_a_record_without_folded_reads_as_nothing_folded():
    old = {"alpha": 0.8, "schedule": "exponential", "top_k": 1, "learnable": False, "factors": [0.8],
           "num_blocks": 6, "merged": True, "version": "0.1.0"}  # written before `folded` existed
    config = ReweightConfig.from_dict(old)
    assert config.folded == [] and config.total_factors() == [1, 1, 1, 1, 1, 0.8]


def test_from_dict_round_trips_folded():
    config = ReweightConfig(alpha=0.9, factors=[0.9, 0.81], num_blocks=2, folded=[0.5, 0.25])
    assert ReweightConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param({"top_k": 2, "factors": [0.8], "num_blocks": 6},
                 r"ReweightConfig has 1 factors, but top_k=2 and num_blocks=6 say 2 blocks are reweighted", id="top-k"),
    pytest.param({"factors": [0.8, 0.64], "num_blocks": 6},
                 r"ReweightConfig has 2 factors, but top_k=None and num_blocks=6 say 6 blocks", id="all-blocks"),
    pytest.param({"top_k": 7, "factors": [0.8] * 7, "num_blocks": 6}, r"top_k=7 is more than num_blocks=6",
                 id="top-k-above-blocks"),
    pytest.param({"factors": [0.8], "num_blocks": 1, "folded": [0.5, 0.5]},
                 r"ReweightConfig\.folded has 2 factors, not one per block \(num_blocks=1\)", id="folded-length"),
    pytest.param({"factors": [0.8], "num_blocks": 1, "folded": [float("nan")]},
                 r"folded\[0\] must be a finite number >= 0, got nan", id="folded-nan"),
    pytest.param({"factors": 0.8, "num_blocks": 1}, r"ReweightConfig\.factors must be a list of factors, got 0\.8",
                 id="factors-not-a-list"),
    pytest.param({"factors": [0.8], "num_blocks": -1}, r"num_blocks must be an int >= 0, got -1", id="negative-blocks"),
])
def test_a_record_whose_parts_disagree_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReweightConfig(alpha=0.8, **kwargs)
