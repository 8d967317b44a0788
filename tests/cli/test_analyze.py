"""``timm-remem analyze``: JSON report and PNG plots, offline, on a tiny ViT and scikit-learn's digits."""

from __future__ import annotations

import argparse
import json

import pytest
import timm

import timm_remem.cli as cli
from timm_remem.cli import analyze

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="timm-remem")
    analyze.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", *argv])
    return args.func(args)


def test_analyze_timm_model_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "report"
    code = run_cli(["test_vit", "--model-kwargs", '{"img_size": 32}', "--max-samples", "48", "--batch-size", "24",
                    "--dynamics-images", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {"name": "digits", "num_samples": 48, "image_size": [32, 32]}
    info = report["information"]
    assert info["n"] == 48 and info["dim"] == 10  # digits: a 10-class head by default
    assert 0.0 <= info["accuracy"] <= 1.0 and info["i_fy"] <= info["h_y"] + 1e-12
    assert len(report["dynamics"]["entropy"]) == 6 and len(report["dynamics"]["spectrum"][0]) == 64
    assert [b["index"] for b in report["expertness"]] == list(range(6))
    assert sorted((r["kind"], r["k"]) for r in report["pruning"]["rows"]) == sorted(
        [(kind, k) for kind in ("mlp", "attn") for k in range(7)]
    )
    assert set(report["plots"]) == {"information_plane", "layer_dynamics", "expertness", "pruning"}
    for name in report["plots"].values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert str(out / "report.json") in capsys.readouterr().out


def test_analyze_folder_of_checkpoints_ranks_them(tmp_path):
    ckpts = tmp_path / "ckpts"
    for i in range(2):
        model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        timm.models.save_for_hf(model, ckpts / f"step{i}", model_args={"img_size": 32}, safe_serialization=True)
    out = tmp_path / "report"
    code = run_cli([str(ckpts), "--analyses", "information,dynamics", "--max-samples", "40", "--dynamics-images",
                    "2", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["information_plane"]] == ["step0", "step1"]
    assert sorted(r["rank"] for r in report["ranking"]) == [1, 2]
    assert report["analyzed_checkpoint"] == report["best_checkpoint"] == report["ranking"][0]["name"]
    assert set(report["plots"]) == {"information_plane", "layer_dynamics"}
    assert "pruning" not in report and "expertness" not in report


@pytest.mark.parametrize(
    "argv,message",
    [
        (["test_vit", "--analyses", "information,everything"], "--analyses"),
        (["not_a_model_name_xyz"], "neither a folder nor a timm model name"),
        (["test_vit", "--noise", "0"], "--noise must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_message(tmp_path, capsys, argv, message):
    assert cli.main(["analyze", *argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("timm-remem analyze: error: ") and err.count("\n") == 1


def test_analyze_refuses_a_folder_that_is_not_ours_and_writes_through_no_symlink(tmp_path):
    from timm_remem.errors import ConfigError

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("the user's own file")
    argv = ["test_vit", "--model-kwargs", '{"img_size": 32}', "--max-samples", "24", "--batch-size", "24",
            "--analyses", "information", "--no-progress"]
    with pytest.raises(ConfigError, match="not empty and not a timm-remem analysis folder: it holds notes.txt"):
        run_cli([*argv, "--out", str(foreign)])
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "report"
    assert run_cli([*argv, "--out", str(out)]) == 0
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"precious")
    plot = next(out.glob("*.png"))
    plot.unlink()
    plot.symlink_to(outside)
    assert run_cli([*argv, "--out", str(out)]) == 0  # its own folder: rerun in place
    assert outside.read_bytes() == b"precious" and not plot.is_symlink()
