"""The ``onepass`` arm and the teachers' sharpness stage: what the arm trains, sharpness values a direct
``measure_sharpness`` call reproduces, intervals and verdicts scipy recomputes, a finished study that gains arms or
sharpness without training anything again, and bad sharpness options refused before anything runs."""

from __future__ import annotations

import json
import shutil

import pytest
import scipy.stats
import timm.data
import torch
import torch.nn.functional as F

import timm_remem.study.runner as runner
from timm_remem import load_teacher
from timm_remem.analysis import measure_sharpness
from timm_remem.data import create_dataset
from timm_remem.errors import ConfigError
from timm_remem.study import (
    DEFAULT_ARMS,
    RESULT_FILE,
    StudyConfig,
    plan_arms,
    run_folder,
    run_settings,
    run_study,
    sharpness_settings,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = dict(quick=True, progress=False, mi=None)


def _t_interval(values, confidence=0.95):
    n = len(values)
    return scipy.stats.t.interval(confidence, n - 1, loc=sum(values) / n, scale=scipy.stats.sem(values))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """plain, sam and onepass teachers (2 seeds each), sharpness on with QUICK's options (1 batch of 16, 5 iters)."""
    out = tmp_path_factory.mktemp("study")
    return run_study(**QUICK, arms=["onepass", "plain", "sam"], output=str(out)), out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study of plain and student without sharpness: copied by each test that grows it."""
    out = tmp_path_factory.mktemp("finished")
    run_study(**QUICK, arms=["plain", "student"], sharpness=None, output=str(out))
    return out


@pytest.fixture
def calls(monkeypatch):
    """Every fine-tune, distillation and sharpness measurement from here on, by the folder it ran for."""
    seen = {"finetune": [], "distill": [], "sharpness": []}
    real = runner.finetune_teacher, runner.distill_student, runner.measure_teacher_sharpness
    monkeypatch.setattr(runner, "finetune_teacher", lambda cfg: seen["finetune"].append(cfg.output) or real[0](cfg))
    monkeypatch.setattr(runner, "distill_student", lambda cfg: seen["distill"].append(cfg.output) or real[1](cfg))
    monkeypatch.setattr(runner, "measure_teacher_sharpness",
                        lambda tcfg, ckpt, *a: seen["sharpness"].append(str(ckpt)) or real[2](tcfg, ckpt, *a))
    return seen


def _grown(finished, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The onepass arm
# ---------------------------------------------------------------------------------------------------------------


def test_onepass_is_an_arm_after_sam_and_not_a_default_one():
    cfg = StudyConfig(teacher="test_vit", student="test_resnet", arms=["onepass", "student", "plain", "sam"], rho=0.1)
    assert cfg.arms == ["plain", "sam", "onepass", "student"]  # report order
    assert StudyConfig(teacher="t", student="s").arms == list(DEFAULT_ARMS) == ["plain", "reweight", "sam", "remem",
                                                                                 "student"]
    onepass = plan_arms(cfg)[2]
    assert (onepass.name, onepass.kind, onepass.rho, onepass.sam, onepass.alpha) == ("onepass", "onepass", 0.1,
                                                                                     "onepass", None)
    ft = run_settings(cfg, onepass, 0)["finetune"]
    assert (ft["sam"], ft["rho"], ft["alpha"]) == ("onepass", 0.1, None)
    assert run_settings(cfg, plan_arms(cfg)[1], 0)["finetune"]["sam"] == "exact"  # the sam arm: the exact SAM


def test_the_onepass_arm_runs_and_its_teacher_trains_with_the_one_pass_sam(study):
    res, out = study
    assert [a["arm"] for a in res.arms] == ["plain", "sam", "onepass"]
    for arm, sam, rho in (("onepass", "onepass", 0.05), ("sam", "exact", 0.05), ("plain", "exact", 0.0)):
        for seed in (0, 1):
            saved = json.loads((run_folder(out, arm, seed) / "teacher" / "config.json").read_text())
            assert (saved["sam"], saved["rho"], saved["alpha"]) == (sam, rho, None)
    onepass = next(a for a in res.arms if a["arm"] == "onepass")
    assert onepass["n"] == 2 and onepass["vs_plain"]["verdict"] in res.verdicts


# ---------------------------------------------------------------------------------------------------------------
# The sharpness stage and its report
# ---------------------------------------------------------------------------------------------------------------


def test_sharpness_is_a_stage_with_its_time(study):
    _, out = study
    for arm in ("plain", "sam", "onepass"):
        stages = json.loads((run_folder(out, arm, 0) / "stages.json").read_text())["stages"]
        assert set(stages) == {"teacher", "sharpness", "student"}
        assert stages["sharpness"]["time_s"] > 0
        assert stages["sharpness"]["settings"] == {"batches": 1, "batch_size": 16, "iters": 5, "tol": 1e-3,
                                                   "rho": 0.05, "eigen": True, "seed": 0}
    data = json.loads((out / "study.json").read_text())
    assert set(data["stage_times_s"]) == {"teacher", "sharpness", "student"}
    assert data["stage_times_s"]["sharpness"] == pytest.approx(sum(r["times"]["sharpness"] for r in data["runs"]))


def test_sharpness_equals_a_direct_measure_sharpness_call_on_the_same_checkpoint_and_images(study):
    _, out = study
    data = json.loads((out / "study.json").read_text())
    for row in data["runs"]:
        model = load_teacher(run_folder(out, row["arm"], row["seed"]) / "teacher" / "checkpoints" / row["checkpoint"])
        dc = timm.data.resolve_model_data_config(model)
        train = create_dataset("digits", split="train", img_size=16, mean=dc["mean"], std=dc["std"])
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:16].tolist()
        x = torch.stack([train[i][0] for i in chosen])
        y = torch.tensor([train[i][1] for i in chosen])
        direct = measure_sharpness(model, [(x, y)], loss_fn=F.cross_entropy, rho=0.05, iters=5, tol=1e-3, seed=0)
        assert row["sam_increase"] == pytest.approx(direct.sam_increase, rel=1e-5, abs=1e-7)
        assert row["top_eigenvalue"] == pytest.approx(direct.top_eigenvalue, rel=1e-5)
        assert (row["sharpness"]["num_samples"], row["sharpness"]["eigen_iterations"]) == (16,
                                                                                          direct.eigen_iterations)


def test_sharpness_intervals_and_verdicts_are_what_scipy_computes_from_the_per_seed_rows(study):
    _, out = study
    data = json.loads((out / "study.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in data["runs"]}
    for arm in data["arms"]:
        for metric in ("sam_increase", "top_eigenvalue"):
            values = [runs[(arm["arm"], s)][metric] for s in (0, 1)]
            low, high = _t_interval(values)
            assert (arm[metric]["low"], arm[metric]["high"]) == (pytest.approx(low), pytest.approx(high))
            if arm["arm"] == "plain":
                continue
            diffs = [runs[(arm["arm"], s)][metric] - runs[("plain", s)][metric] for s in (0, 1)]
            d = arm["vs_plain"][metric]
            low, high = (diffs[0], diffs[0]) if diffs[0] == diffs[1] else _t_interval(diffs)
            assert (d["low"], d["high"]) == (pytest.approx(low), pytest.approx(high))
            expected = "flatter" if high < 0 else "sharper" if low > 0 else "no detectable difference at this N"
            assert arm["vs_plain"]["sharpness_verdicts"][metric] == expected
        assert arm["sharpness"] == {"runs": 2, "eigen_converged": sum(
            bool(runs[(arm["arm"], s)]["sharpness"]["eigen_converged"]) for s in (0, 1))}


def test_the_sharpness_table_is_printed_and_in_study_md(study):
    res, out = study
    md = (out / "study.md").read_text()
    assert res.table in md
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| arm") and "SAM increase (rho 0.05)" in line)
    assert "top Hessian eigenvalue" in header and "eigenvalue - plain (paired)" in header
    onepass = next(line for line in lines[lines.index(header):] if line.startswith("| onepass "))
    arm = next(a for a in res.arms if a["arm"] == "onepass")
    cells = [c.strip() for c in onepass.strip("|").split("|")]
    assert cells[3] == arm["vs_plain"]["sharpness_verdicts"]["sam_increase"]
    assert cells[6] == arm["vs_plain"]["sharpness_verdicts"]["top_eigenvalue"]
    assert "lower is flatter" in md and "at most 5 iterations" in md


def test_format_number_rounds_to_the_half_widths_second_digit():
    from timm_remem.study.report import format_number

    assert format_number({"mean": 0.123456, "half_width": 0.0345}) == "0.123 ± 0.035"
    assert format_number({"mean": 61.2, "half_width": 4.71}, signed=True) == "+61.2 ± 4.7"
    assert format_number({"mean": 0.5, "half_width": None}) == "0.5000"
    assert format_number(None) == "-"


# ---------------------------------------------------------------------------------------------------------------
# A finished study grows without training again
# ---------------------------------------------------------------------------------------------------------------


def test_turning_sharpness_on_for_a_finished_study_measures_only_the_sharpness(finished, tmp_path, calls):
    out = _grown(finished, tmp_path)
    before = json.loads((out / "study.json").read_text())
    assert all(r.get("sam_increase") is None for r in before["runs"])
    res = run_study(**QUICK, arms=["plain", "student"], output=str(out))
    assert calls["finetune"] == calls["distill"] == []
    assert sorted(calls["sharpness"]) == sorted(
        str(run_folder(out, "plain", s) / "teacher" / "checkpoints" / "epoch-001") for s in (0, 1))
    plain = [r for r in res.runs if r["arm"] == "plain"]
    assert all(r["sam_increase"] is not None and r["top_eigenvalue"] is not None for r in plain)
    old = {(r["arm"], r["seed"]): r for r in before["runs"]}
    for r in res.runs:  # the training results are the ones on disk
        assert (r["teacher_acc"], r["student_acc"]) == (old[(r["arm"], r["seed"])]["teacher_acc"],
                                                        old[(r["arm"], r["seed"])]["student_acc"])
    saved = json.loads((run_folder(out, "plain", 0) / RESULT_FILE).read_text())
    assert saved["sam_increase"] == plain[0]["sam_increase"] and "sharpness" in saved["times"]
    assert res.arms[0]["sam_increase"] is not None and "SAM increase" in (out / "study.md").read_text()


def test_a_changed_sharpness_option_remeasures_only_the_sharpness(finished, tmp_path, calls):
    out = _grown(finished, tmp_path)
    first = run_study(**QUICK, arms=["plain", "student"], output=str(out))
    calls["sharpness"].clear()
    again = run_study(**QUICK, arms=["plain", "student"], output=str(out))
    assert calls == {"finetune": [], "distill": [], "sharpness": []} and again.runs == first.runs
    changed = run_study(**QUICK, arms=["plain", "student"], sharpness={"iters": 2, "eigen": False},
                        output=str(out))
    assert calls["finetune"] == calls["distill"] == [] and len(calls["sharpness"]) == 2
    plain = [r for r in changed.runs if r["arm"] == "plain"]
    assert all(r["top_eigenvalue"] is None and r["sharpness"]["settings"]["iters"] == 2 for r in plain)
    assert [r["sam_increase"] for r in plain] == [r["sam_increase"] for r in first.runs if r["arm"] == "plain"]


def test_switching_sharpness_off_drops_it_from_the_report_and_back_on_reuses_the_stage(finished, tmp_path, calls):
    out = _grown(finished, tmp_path)
    on = run_study(**QUICK, arms=["plain", "student"], output=str(out))
    off = run_study(**QUICK, arms=["plain", "student"], sharpness=None, output=str(out))
    assert all(r["sam_increase"] is None and r["sharpness"] is None and "sharpness" not in r["times"]
               for r in off.runs)
    assert "SAM increase" not in (out / "study.md").read_text()
    assert len(calls["sharpness"]) == 2
    back = run_study(**QUICK, arms=["plain", "student"], output=str(out))
    assert len(calls["sharpness"]) == 2 and back.runs == on.runs  # the stage on disk, measured once
    assert calls["finetune"] == calls["distill"] == []


def test_adding_onepass_to_a_finished_study_runs_only_the_new_arm(finished, tmp_path, calls):
    out = _grown(finished, tmp_path)
    res = run_study(**QUICK, arms=["plain", "onepass", "student"], sharpness=None, output=str(out))
    assert sorted(calls["finetune"]) == [str(run_folder(out, "onepass", s) / "teacher") for s in (0, 1)]
    assert sorted(calls["distill"]) == [str(run_folder(out, "onepass", s) / "student") for s in (0, 1)]
    assert calls["sharpness"] == []
    assert [a["arm"] for a in res.arms] == ["plain", "onepass", "student"]


def test_adding_onepass_and_sharpness_at_once_trains_only_the_new_arm(finished, tmp_path, calls):
    out = _grown(finished, tmp_path)
    run_study(**QUICK, arms=["plain", "onepass", "student"], output=str(out))
    assert sorted(calls["finetune"]) == [str(run_folder(out, "onepass", s) / "teacher") for s in (0, 1)]
    assert len(calls["distill"]) == 2 and len(calls["sharpness"]) == 4  # plain's two measured, onepass's two


def test_a_run_finished_before_finetune_had_a_sam_setting_is_not_recomputed(finished, tmp_path, calls):
    out = _grown(finished, tmp_path)
    for seed in (0, 1):  # what a study folder written before FinetuneConfig.sam existed holds
        for name in (RESULT_FILE, "stages.json"):
            path = run_folder(out, "plain", seed) / name
            data = json.loads(path.read_text())
            del data["settings"]["finetune"]["sam"]
            path.write_text(json.dumps(data))
    run_study(**QUICK, arms=["plain", "student"], sharpness=None, output=str(out))
    assert calls == {"finetune": [], "distill": [], "sharpness": []}


def test_sharpness_of_a_finished_run_whose_checkpoint_is_gone_is_refused_with_the_fix(finished, tmp_path):
    out = _grown(finished, tmp_path)
    shutil.rmtree(run_folder(out, "plain", 0) / "teacher" / "checkpoints")
    with pytest.raises(ConfigError, match=r"the sharpness stage needs the teacher checkpoint '.*epoch-001', which is "
                                          r"not there .*delete that run's folder to recompute the run, or switch the "
                                          r"measurement off \(sharpness=None, --no-sharpness\)"):
        run_study(**QUICK, arms=["plain", "student"], output=str(out))


# ---------------------------------------------------------------------------------------------------------------
# Options and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_sharpness_options_have_defaults_and_rho_follows_the_study():
    cfg = StudyConfig(teacher="t", student="s", rho=0.2)
    assert sharpness_settings(cfg) == {"batches": 4, "batch_size": 32, "iters": 30, "tol": 1e-3, "rho": 0.2,
                                       "eigen": True, "seed": 0}
    cfg = StudyConfig(teacher="t", student="s", sharpness={"rho": 0.01, "batches": 2})
    assert (sharpness_settings(cfg)["rho"], sharpness_settings(cfg)["batches"]) == (0.01, 2)
    assert sharpness_settings(StudyConfig(teacher="t", student="s", sharpness=None)) is None


def test_sharpness_options_do_not_belong_to_the_study_folders_settings():
    a = StudyConfig(teacher="t", student="s")
    b = StudyConfig(teacher="t", student="s", sharpness={"iters": 3})
    assert a.fingerprint() == b.fingerprint() and "sharpness" not in a.fingerprint()
    assert run_settings(a, plan_arms(a)[0], 0) == run_settings(b, plan_arms(b)[0], 0)


@pytest.mark.parametrize(("settings", "match"), [
    pytest.param({"arms": ["plain", "one-pass"]},
                 r"unknown arm\(s\) \['one-pass'\]; a study's arms are plain, reweight, sam, remem, student \(the "
                 r"default\) and onepass", id="unknown-arm"),
    pytest.param({"sharpness": {"iterations": 5}},
                 r"unknown sharpness option\(s\) \['iterations'\]; valid: \['batches', 'batch_size', 'iters', 'tol', "
                 r"'rho', 'eigen', 'seed'\] \(or sharpness=None, --no-sharpness, to skip the measurement\)",
                 id="unknown-option"),
    pytest.param({"sharpness": {"batches": 0}}, r"sharpness batches must be a positive integer, got 0",
                 id="no-batches"),
    pytest.param({"sharpness": {"batch_size": 8.0}}, r"sharpness batch_size must be a positive integer, got 8.0",
                 id="float-batch-size"),
    pytest.param({"sharpness": {"iters": 0}}, r"sharpness iters must be a positive integer, got 0", id="no-iters"),
    pytest.param({"sharpness": {"tol": 0}}, r"sharpness tol must be a finite number > 0, got 0; a relative "
                                            r"tolerance such as 1e-3", id="zero-tol"),
    pytest.param({"sharpness": {"rho": -0.05}}, r"sharpness rho must be a finite number > 0 or None, got -0.05; "
                                                r"SAM's radius, e.g. 0.05; None takes the study's rho", id="bad-rho"),
    pytest.param({"sharpness": {"eigen": "no"}}, r"sharpness eigen must be True or False, got 'no'", id="bad-eigen"),
    pytest.param({"sharpness": {"seed": -1}}, r"sharpness seed must be an integer >= 0, got -1", id="bad-seed"),
    pytest.param({"sharpness": True}, r"sharpness must be a mapping of sharpness options such as \{'iters': 20\}, or "
                                      r"None \(--no-sharpness\) to skip the measurement, got True", id="not-a-mapping"),
    pytest.param({"finetune": {"sam": "onepass"}},
                 r"finetune setting\(s\) \['sam'\] are set by the study itself .*sam by the arm: sam or onepass",
                 id="finetune-sets-sam"),
])
def test_bad_arms_and_sharpness_options_are_refused_before_anything_runs(settings, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        run_study(**QUICK, output=str(tmp_path / "s"), **settings)
    assert not (tmp_path / "s").exists()
