"""Bad input to ``run_study`` (``timm-remem study``): one error each, raised before anything runs; "kept" cases
also check that the study folder is exactly what it was before."""

from __future__ import annotations

import json

import pytest

from timm_remem import ConfigError
from timm_remem.study import SETTINGS_FILE, load_config, run_study

pytestmark = pytest.mark.usefixtures("one_thread")


def _raises(error, match, call, *args, **kwargs):
    with pytest.raises(error, match=f"(?s){match}") as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


_SETTINGS = [
    pytest.param({"arms": ["plain", "distilled"]},
                 r"unknown arm\(s\) \['distilled'\]; a study's arms are plain, reweight, sam, remem, student",
                 id="unknown-arm"),
    pytest.param({"seeds": 1},
                 r"seeds=1: a confidence interval needs at least 2 seeds per arm; pass seeds=2 or more .*"
                 r"or confidence=None \(--confidence none\)", id="one-seed-with-intervals"),
    pytest.param({"teacher": "test_resnet", "arms": ["plain", "reweight", "remem", "student"]},
                 r"teacher 'test_resnet' cannot be reweighted, so arm\(s\) \['reweight', 'remem'\] cannot run: .*"
                 r"Arms that can still run with this teacher: plain, student \(e.g. --arms plain student\)",
                 id="teacher-not-reweightable"),
    pytest.param({"finetune": {"alpha": 0.5}},
                 r"finetune setting\(s\) \['alpha'\] are set by the study itself", id="stage-sets-study-field"),
    pytest.param({"distill": {"epoch": 2}}, r"unknown distill setting\(s\) \['epoch'\]; valid: ",
                 id="unknown-stage-setting"),
    pytest.param({"alpha": []}, r"alpha must be a non-empty list of reweighting factors such as \[0.85\]",
                 id="empty-alpha"),
    pytest.param({"schedule": ["linear"]}, r"schedule must list 'exponential' and/or 'constant', got \['linear'\]",
                 id="unknown-schedule"),
    pytest.param({"mi": {"estimator": "ksg"}}, r"unknown mi option\(s\) \['estimator'\]", id="unknown-mi-option"),
]


@pytest.mark.parametrize(("settings", "match"), _SETTINGS)
def test_study_rejects(settings, match, tmp_path):
    _raises(ConfigError, match, run_study, quick=True, progress=False, output=str(tmp_path / "s"), **settings)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_study_folder_rejects_another_study_kept(tmp_path):
    out = tmp_path / "s"
    run_study(quick=True, arms=["student"], progress=False, output=str(out))
    before = _snapshot(out)
    _raises(ConfigError, r"study folder '.*' holds another study's settings: rho=0.05 \(folder\) vs 0.1 \(now\)\. "
            r"Rerun with the same settings to resume it", run_study, quick=True, arms=["student"], rho=0.1,
            progress=False, output=str(out))
    assert _snapshot(out) == before
    assert json.loads((out / SETTINGS_FILE).read_text())["rho"] == 0.05


def test_study_folder_rejects_non_study_folder_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _raises(ConfigError, r"is not empty and holds no study \(study-settings.json is missing\); choose another "
            "output folder", run_study, quick=True, progress=False, output=str(tmp_path))
    assert _snapshot(tmp_path) == {"notes.txt": b"mine"}


@pytest.mark.parametrize(("name", "text", "match"), [
    pytest.param("s.yaml", "teacher: [unclosed", r"study config '.*s.yaml' is not valid YAML", id="bad-yaml"),
    pytest.param("s.json", "[1, 2]", r"study config '.*s.json' must hold a mapping of settings, got list",
                 id="not-a-mapping"),
    pytest.param("missing.yaml", None, r"study config file '.*missing.yaml' does not exist", id="missing-file"),
])
def test_study_config_file_rejects(name, text, match, tmp_path):
    if text is not None:
        (tmp_path / name).write_text(text)
    _raises(ConfigError, match, load_config, tmp_path / name)
