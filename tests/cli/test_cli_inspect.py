"""``timm-remem inspect``: the table and JSON list each MLP branch, where its scale sits and its factor."""

from __future__ import annotations

import json

import pytest

import timm_remem.cli as cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}'


def inspect_json(capsys, *args: str) -> dict:
    assert cli.main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_lists_every_block_with_its_factor(capsys):
    out = inspect_json(capsys, "test_vit", "--model-kwargs", '{"img_size": 32}', "--alpha", "0.5", "--top-k", "2")
    assert out["num_blocks"] == 6
    assert [r["branch"] for r in out["branches"]] == [f"blocks.{i}.mlp" for i in range(6)]
    assert [r["factor"] for r in out["branches"]] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25]
    assert {r["kind"] for r in out["branches"]} == {"mlp-output"}
    assert {r["block_class"] for r in out["branches"]} == {"Block"}


def test_post_norm_branches_are_marked(capsys):
    out = inspect_json(capsys, "vit_base_patch16_rpn_224", "--model-kwargs", SMALL)
    assert [(r["branch"], r["kind"]) for r in out["branches"]] == [(f"blocks.{i}.norm2", "post-norm") for i in range(3)]


def test_fused_projection_columns_are_marked(capsys):
    out = inspect_json(capsys, "vit_dpwee_patch16_reg1_gap_256", "--model-kwargs", SMALL, "--schedule", "constant")
    assert [(r["branch"], r["kind"]) for r in out["branches"]] == [(f"blocks.{i}.out_proj", "fused-columns")
                                                                    for i in range(3)]
    assert [r["factor"] for r in out["branches"]] == pytest.approx([0.85] * 3)  # stored as float32


def test_table_has_a_header_and_one_row_per_block(capsys):
    assert cli.main(["inspect", "test_vit", "--model-kwargs", '{"img_size": 32}']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test_vit: 6 blocks with a transformer MLP branch (alpha=0.85")
    assert lines[1].split() == ["block", "branch", "where", "block", "class", "factor"]
    assert len(lines) == 2 + 6 and lines[-1].split()[-1] == f"{0.85 ** 6:.4f}"
