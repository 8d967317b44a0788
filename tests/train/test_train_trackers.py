"""Experiment trackers (timm_remem.train.trackers): TensorBoard event files and an offline wandb run, each holding the
epoch metrics that metrics.jsonl holds; each an optional extra with an ImportError naming it.

The event files are read back with TensorBoard's own reader; the wandb run is offline (``WANDB_MODE=offline``, its
files in a temporary folder, no network).
"""

from __future__ import annotations

import json
import re
import struct
import sys

import pytest
from train_cases import VIT

from timm_remem.train import finetune_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(VIT, epochs=2, limit_train_batches=2, save_at=[])


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_history(path) -> list[dict]:
    """The ``history`` records of an offline ``run-<id>.wandb`` file, read here (leveldb-log framing: a 7-byte file
    header, 32 KiB blocks, records of crc32/length/type + a ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, payload, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_tensorboard_event_files_hold_the_epoch_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    finetune_teacher(**RUN, log=["tensorboard"], output=str(tmp_path))
    scalars, records = _scalars(tmp_path / "tensorboard"), _metrics(tmp_path)
    for tag in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [s for s, _ in scalars[tag]] == [r["step"] for r in records]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[tag] for r in records], rel=1e-6)  # float32
    assert [v for _, v in scalars["epoch"]] == [1.0, 2.0]


def test_a_resumed_run_drops_the_events_after_its_checkpoint(tmp_path):
    """A crash after the step-2 checkpoint left epoch-2 events; the resumed run's epoch 2 replaces them."""
    pytest.importorskip("tensorboard")
    finetune_teacher(**RUN, log=["tensorboard"], output=str(tmp_path / "run"))
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "run", cut)
    shutil.rmtree(cut / "train-state" / "step-000000004")  # as if killed before the last checkpoint
    finetune_teacher(**RUN, log=["tensorboard"], output=str(cut), resume=True)
    steps = [s for s, _ in _scalars(cut / "tensorboard")["val_acc"]]
    assert steps == [2, 4]  # not [2, 4, 4]


def test_wandb_offline_run_is_written_inside_the_output_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))  # what wandb would use without dir=
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    finetune_teacher(**RUN, log=["wandb"], output=str(out))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (out / "wandb").iterdir())
    run_id = (out / "wandb" / "run-id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    history, records = _wandb_history(runs[0] / f"run-{run_id}.wandb"), _metrics(out)
    assert [row["_step"] for row in history] == [r["step"] for r in records]
    assert [row["epoch"] for row in history] == [1, 2]
    for tag in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [row[tag] for row in history] == pytest.approx([r[tag] for r in records])
    assert not (tmp_path / "wandb-default").exists()  # nothing outside the output folder


@pytest.mark.parametrize(("tracker", "module", "extra"), [
    pytest.param("tensorboard", "torch.utils.tensorboard", "timm-remem[tensorboard]", id="tensorboard"),
    pytest.param("wandb", "wandb", "timm-remem[wandb]", id="wandb"),
])
def test_a_missing_tracker_package_names_its_extra_before_training(tmp_path, monkeypatch, tracker, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=re.escape(f"pip install {extra}")):
        finetune_teacher(**RUN, log=[tracker], output=str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()
