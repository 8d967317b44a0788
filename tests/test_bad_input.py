"""The bad-input matrix (issue 7): every row of docs/bad-input.md is one test case here.

Each case feeds one bad input to the public API and checks what the user sees: the exception's exact type and the
key part of its message (the bad value and the fix). Where the issue says "nothing already saved is lost", the case
also checks that what existed before the failure (reweighting factors, weights, checkpoints, teacher folders, Hub
revisions) is still intact afterwards, against a copy taken before the failure.

Rows marked ``xfail(strict=True)`` are gaps in the library: the test states the behaviour we want; the reason says
what happens today. When the owner fixes one, its test passes, strict xfail turns that into a failure, and the
marker must be removed (and the row's "today" note in docs/bad-input.md with it).

``test_docs_table_lists_exactly_these_cases`` keeps docs/bad-input.md and this file in step.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import re
import shutil
import socket
from pathlib import Path

import pytest
import timm
import torch
from hub_server import ALICE_WRITE, no_retry_waits, use_hub
from PIL import Image
from safetensors.torch import load_file, save_file

import timm_remem.cli as cli
from timm_remem import (
    CheckpointError,
    ConfigError,
    DistillationLoss,
    HubError,
    NotReweightedError,
    RememError,
    Teacher,
    UnsupportedModelError,
    get_scales,
    kd_loss,
    load_teacher,
    merge,
    push_to_hub,
    reweight,
    save_pretrained,
    unreweight,
)
from timm_remem.checkpoint import load_checkpoint, save_checkpoint
from timm_remem.data import create_dataset, create_loader
from timm_remem.reweighting import ScaledBranch
from timm_remem.sam import SAM

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
BAD_INPUT_DIR = Path(__file__).resolve().parent / "bad_input"  # the per-room matrices, one file per room
NAN, INF = float("nan"), float("inf")
# "Learned" factors, away from any alpha schedule and from 1, so a lost reweighting cannot go unnoticed.
LEARNED = [0.9, 0.7, 0.55, 0.45, 0.35, 0.3]


def xfail(reason: str, raises: type[BaseException]) -> pytest.MarkDecorator:
    """A known gap: strict (a fix makes the test fail until the marker is removed) and pinned to today's error."""
    return pytest.mark.xfail(strict=True, raises=raises, reason=reason)


def _raises(error: type[BaseException], match: str, call, *args, **kwargs):
    """Run ``call(*args, **kwargs)``; assert it raises exactly ``error`` (not a subclass) and that ``match`` is found
    in its message (``.`` also matches newlines: some messages carry a usage example)."""
    with pytest.raises(error, match=f"(?s){match}") as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


def _vit(**kwargs) -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, img_size=32, **kwargs)  # 6 blocks


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: an independent record of what was on disk before a failure."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _merged_twice(m):
    merge(reweight(m, alpha=0.8))
    return merge(m)


def _unreweight_merged(m):
    merge(reweight(m, alpha=0.8))
    return unreweight(m)


# ============================================================================================== reweight

REWEIGHT_CASES = [
    pytest.param(lambda m: reweight(m, alpha=0), ConfigError,
                 r"alpha must be a finite number > 0, got 0; .*alpha=0\.85",
                 id="alpha-zero"),
    pytest.param(lambda m: reweight(m, alpha=-0.5), ConfigError, r"alpha must be a finite number > 0, got -0\.5",
                 id="alpha-negative"),
    pytest.param(lambda m: reweight(m, alpha=NAN), ConfigError, r"alpha must be a finite number > 0, got nan",
                 id="alpha-nan"),
    pytest.param(lambda m: reweight(m, alpha=INF), ConfigError, r"alpha must be a finite number > 0, got inf",
                 id="alpha-inf"),
    pytest.param(lambda m: reweight(m, alpha="0.85"), ConfigError, r"alpha must be a real number, got '0\.85' \(str\)",
                 id="alpha-string"),
    pytest.param(lambda m: reweight(m, schedule="linear"), ConfigError,
                 r"unknown schedule 'linear': use 'exponential', 'constant', a sequence of factors",
                 id="schedule-unknown"),
    pytest.param(lambda m: reweight(m, schedule=[0.9, 0.8]), ConfigError,
                 r"schedule has 2 factors but 6 blocks are reweighted: give one factor per reweighted block.*"
                 r"change top_k to 2", id="schedule-wrong-length"),
    pytest.param(lambda m: reweight(m, schedule=[0.9] * 5 + [-0.1]), ConfigError,
                 r"schedule\[5\] must be a finite number >= 0, got -0\.1", id="schedule-negative-factor"),
    pytest.param(lambda m: reweight(m, schedule=lambda i, k: "half"), ConfigError,
                 r"schedule\(0, 6\) must be a real number, got 'half' \(str\)", id="schedule-callable-returns-string"),
    pytest.param(lambda m: reweight(m, top_k=0), ConfigError,
                 r"top_k=0 is out of range: VisionTransformer has 6 blocks with an MLP branch; use 1 <= top_k <= 6",
                 id="top-k-zero"),
    pytest.param(lambda m: reweight(m, top_k=7), ConfigError, r"top_k=7 is out of range: .*1 <= top_k <= 6",
                 id="top-k-too-large"),
    pytest.param(lambda m: reweight(m, top_k=True), ConfigError,
                 r"top_k must be a positive int or None \(all blocks\), got True", id="top-k-bool"),
    pytest.param(lambda m: reweight(m, learnable="yes"), ConfigError, r"learnable must be True or False, got 'yes'",
                 id="learnable-string"),
    pytest.param(lambda m: reweight(timm.create_model("test_resnet", pretrained=False)), UnsupportedModelError,
                 r"ResNet has no transformer MLP residual branch: no submodule named mlp.*convolutional networks have "
                 r"no MLP branch", id="resnet"),
    pytest.param(lambda m: reweight(timm.create_model("test_convnext", pretrained=False)), UnsupportedModelError,
                 r"ConvNeXt has no transformer MLP residual branch: .*ConvNeXt-style block.*Use a vision transformer",
                 id="convnext"),
    pytest.param(lambda m: reweight("vit_base_patch16_224"), ConfigError,
                 r"expected a torch\.nn\.Module \(a timm model\), got str",
                 id="model-name-instead-of-model"),
    pytest.param(_merged_twice, NotReweightedError,
                 r"cannot merge VisionTransformer: it is not reweighted\. It was already merged", id="merge-twice"),
    pytest.param(merge, NotReweightedError,
                 r"cannot merge VisionTransformer: it is not reweighted\. Call timm_remem\.reweight\(model, alpha=",
                 id="merge-never-reweighted"),
    pytest.param(unreweight, NotReweightedError,
                 r"cannot unreweight VisionTransformer: it is not reweighted\. Call timm_remem\.reweight",
                 id="unreweight-never-reweighted"),
    pytest.param(_unreweight_merged, NotReweightedError,
                 r"cannot unreweight VisionTransformer: it is not reweighted\. It was already merged",
                 id="unreweight-after-merge"),
]


@pytest.mark.parametrize(("call", "error", "match"), REWEIGHT_CASES)
def test_reweight_rejects(call, error, match):
    _raises(error, match, call, _vit())


KEEP_CASES = [
    pytest.param({"alpha": NAN}, r"alpha must be a finite number > 0, got nan", id="bad-alpha"),
    pytest.param({"alpha": 0.8, "top_k": 7}, r"top_k=7 is out of range",
                 id="top-k-out-of-range"),
    pytest.param({"schedule": [0.9, 0.8]}, r"schedule has 2 factors but 6 blocks",
                 id="schedule-wrong-length"),
]


@pytest.mark.parametrize(("kwargs", "match"), KEEP_CASES)
def test_failed_reweight_keeps_the_current_factors(kwargs, match):
    model = reweight(_vit(), alpha=0.5, learnable=True).eval()
    with torch.no_grad():
        for wrapper in model.modules():
            if isinstance(wrapper, ScaledBranch):
                wrapper.remem_scale.fill_(LEARNED[wrapper.index])  # as if the factors had been trained
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    _raises(ConfigError, match, lambda: reweight(model, **kwargs))
    assert get_scales(model) == {f"blocks.{i}.mlp": pytest.approx(f) for i, f in enumerate(LEARNED)}
    with torch.no_grad():
        assert torch.equal(model(x), before)


# ============================================================================================== SAM


def _lin() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _closure(model, x):
    def closure():
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    return closure


def _second_step_first(m):
    SAM(m.parameters(), torch.optim.SGD, lr=0.1).second_step()


def _first_step_without_backward(m):
    SAM(m.parameters(), torch.optim.SGD, lr=0.1).first_step()


def _first_step_twice(m):
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    m(torch.ones(1, 3)).sum().backward()
    opt.first_step()
    opt.first_step()


SAM_CASES = [
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1), ConfigError,
                 r"SAM rho must be a finite number >= 0 \(typical: 0\.05 to 0\.5\), got -0\.1", id="rho-negative"),
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=NAN, lr=0.1), ConfigError,
                 r"SAM rho must be a finite number >= 0 .*got nan", id="rho-nan"),
    pytest.param(lambda m: SAM([{"params": m.parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1), ConfigError,
                 r"param group rho must be a finite number >= 0 .*got -1\.0", id="group-rho-negative"),
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1)), ConfigError,
                 r"base_optimizer must be an optimizer class such as torch\.optim\.AdamW, got an instance of SGD\. "
                 r"Pass the class", id="base-optimizer-instance"),
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentun=0.9), ConfigError,
                 r"'momentun'.*(SGD|SAM)",
                 id="unknown-base-kwarg"),
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1).step(), ConfigError,
                 r"SAM\.step\(\) needs a closure\.\nSAM needs two forward/backward passes.*"
                 r"loss = opt\.step\(closure\)",
                 id="step-without-closure"),
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1).step(3), ConfigError,
                 r"SAM\.step\(\) got a closure that is not callable: 3", id="step-closure-not-callable"),
    pytest.param(lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1).step(_closure(m, torch.ones(1, 3)),
                                                                              scaler="fp16"),
                 ConfigError, r"scaler must be a torch\.amp\.GradScaler or None, got str", id="scaler-not-a-scaler"),
    pytest.param(_second_step_first, RememError,
                 r"second_step\(\) was called without first_step\(\): call loss\.backward\(\), then first_step\(\)",
                 id="second-step-first"),
    pytest.param(_first_step_without_backward, RememError,
                 r"first_step\(\) found no gradients: run loss\.backward\(\) before first_step\(\)",
                 id="first-step-without-backward"),
    pytest.param(_first_step_twice, RememError,
                 r"first_step\(\) was called twice without second_step\(\) in between", id="first-step-twice"),
]


@pytest.mark.parametrize(("call", "error", "match"), SAM_CASES)
def test_sam_rejects(call, error, match):
    _raises(error, match, call, _lin())


def test_sam_refuses_grad_scaler_step_and_stays_usable():
    model, x = _lin(), torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled()

    def closure():
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        return loss

    scaler.scale(model(x).pow(2).mean()).backward()  # the usual AMP loop, then scaler.step(opt, closure)
    _raises(ConfigError, r"GradScaler\.step\(sam, \.\.\.\) cannot drive SAM: .*still multiplied by the loss scale\. "
            r"Give the scaler to SAM instead.*opt\.step\(closure, scaler=scaler\)", scaler.step, opt, closure)
    for name, value in model.state_dict().items():  # nothing was applied
        assert torch.equal(value, before[name]), name
    # The right usage still works afterwards: one SGD step from the unscaled gradient at the perturbed point.
    opt.step(closure, scaler=scaler)
    assert opt.stats.sam_step and not opt.stats.skipped
    assert not torch.equal(model.weight, before["weight"])


def test_sam_nan_gradients_skip_the_step_and_count_it():
    model = _lin()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    bad = torch.full((4, 3), NAN)
    assert opt.step(_closure(model, bad)).isnan()  # no exception: the loss comes back, the step is skipped
    assert (opt.skipped_steps, opt.stats.skipped, opt.stats.sam_step) == (1, True, False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert opt.base_optimizer.state == {} or all(not s for s in opt.base_optimizer.state.values())  # no momentum
    opt.step(_closure(model, torch.ones(4, 3)))  # the next finite batch trains normally
    assert (opt.skipped_steps, opt.stats.skipped) == (1, False)
    assert not torch.equal(model.weight, before["weight"])


def test_sam_bad_max_grad_norm_leaves_the_weights_untouched():
    model = _lin()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    _raises(ConfigError, r"max_grad_norm must be a finite number > 0 or None, got -1",
            opt.step, _closure(model, torch.ones(4, 3)), max_grad_norm=-1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name



def test_sam_different_scaler_in_second_step_can_still_finish_the_step():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))

    def two_steps(model, opt, scaler, wrong=None):
        scaler.scale(model(x).pow(2).mean()).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        scaler.scale(model(x).pow(2).mean()).backward()
        if wrong is not None:
            _raises(ConfigError, r"second_step\(\) got a different GradScaler than first_step\(\): pass the same "
                    r"scaler to both", opt.second_step, scaler=wrong)
        opt.second_step(zero_grad=True, scaler=scaler)

    reference = _lin()
    two_steps(reference, SAM(reference.parameters(), torch.optim.SGD, rho=0.5, lr=0.1),
              torch.amp.GradScaler("cpu", init_scale=8.0))
    model = _lin()
    two_steps(model, SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1),
              torch.amp.GradScaler("cpu", init_scale=8.0), wrong=torch.amp.GradScaler("cpu"))
    assert torch.equal(model.weight, reference.weight) and torch.equal(model.bias, reference.bias)


# ============================================================================================== losses

S, T = torch.randn(4, 10), torch.randn(4, 10)
LABELS = torch.tensor([1, 0, 3, 9])

LOSS_CASES = [
    pytest.param(lambda: kd_loss(S.view(4, 10, 1), T.view(4, 10, 1)), ConfigError,
                 r"distillation expects logits shaped \[batch, num_classes\], got student \(4, 10, 1\) and teacher "
                 r"\(4, 10, 1\); flatten extra dimensions", id="kd-3d-logits"),
    pytest.param(lambda: kd_loss(S, T[:3]), ConfigError,
                 r"batch sizes differ: student logits \(4, 10\) vs teacher logits \(3, 10\); compute teacher logits on "
                 r"the same batch", id="kd-batch-mismatch"),
    pytest.param(lambda: kd_loss(S, T[:, :5]), ConfigError,
                 r"teacher has 5 classes but student has 10; .*Create the student with num_classes equal to the "
                 r"teacher's", id="kd-class-count-mismatch"),
    pytest.param(lambda: kd_loss(S, T, temperature=0), ConfigError,
                 r"temperature must be a positive finite number, got 0; use e\.g\. temperature=1\.0",
                 id="kd-temperature-zero"),
    pytest.param(lambda: kd_loss(S, T, temperature=-2.0), ConfigError,
                 r"temperature must be a positive finite number, got -2\.0", id="kd-temperature-negative"),
    pytest.param(lambda: kd_loss(S, T, temperature=NAN), ConfigError,
                 r"temperature must be a positive finite number, got nan", id="kd-temperature-nan"),
    pytest.param(lambda: kd_loss(S, T, temperature="hot"), ConfigError,
                 r"temperature must be a positive finite number, got 'hot'", id="kd-temperature-string"),
    pytest.param(lambda: DistillationLoss("kd", temperature=0.0), ConfigError,
                 r"temperature must be a positive finite number, got 0\.0", id="loss-temperature-zero"),
    pytest.param(lambda: DistillationLoss("soft"), ConfigError,
                 r"method must be one of \('kd', 'hard', 'dist'\), got 'soft'", id="loss-unknown-method"),
    pytest.param(lambda: DistillationLoss(task_weight=0, distill_weight=0), ConfigError,
                 r"task_weight and distill_weight are both 0, so the loss is constant; make one positive",
                 id="loss-both-weights-zero"),
    pytest.param(lambda: DistillationLoss("hard")(S, T[:, :5], LABELS), ConfigError,
                 r"teacher has 5 classes but student has 10", id="loss-hard-class-count-mismatch"),
    pytest.param(lambda: DistillationLoss()(S, T, LABELS[:3]), ConfigError,
                 r"integer targets must be class labels shaped \[4\], got \(3,\)", id="loss-labels-wrong-shape"),
    pytest.param(lambda: DistillationLoss()(S, T), ConfigError,
                 r"target is None but task_weight=1\.0; pass labels, or set task_weight=0", id="loss-missing-labels"),
    pytest.param(lambda: Teacher(_vit(num_classes=10), timm.create_model("test_resnet", pretrained=False,
                                                                         num_classes=5)),
                 ConfigError, r"teacher num_classes=10 differs from student num_classes=5; .*create the student with "
                 r"num_classes=10", id="teacher-student-num-classes"),
    pytest.param(lambda: Teacher(_vit())(torch.randn(2, 3, 32)), ConfigError,
                 r"teacher input must be an image batch \[B, C, H, W\], got shape \(2, 3, 32\)", id="teacher-input-3d"),
]


@pytest.mark.parametrize(("call", "error", "match"), LOSS_CASES)
def test_losses_reject(call, error, match):
    _raises(error, match, call)


# ============================================================================================== hub

hub_mark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(3)
    model = reweight(_vit(num_classes=5), alpha=0.8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the initialisation
    return model.eval()


@pytest.fixture(scope="module")
def saved(teacher, tmp_path_factory):
    """A teacher folder written once; cases work on copies."""
    return save_pretrained(teacher, tmp_path_factory.mktemp("saved"), merge=False, dataset="cifar100")


def _drop_key(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["blocks.0.mlp.fc2.bias"]
    save_file(tensors, folder / "model.safetensors")


def _extra_key(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["head.extra"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


HUB_REPO_ID = r"repo_id must be 'namespace/name' \(your user or organisation, then the model name.*got "

HUB_ID_CASES = [
    pytest.param(lambda m, d: save_pretrained(m, d, repo_id="vit-remem"), ConfigError, HUB_REPO_ID + r"'vit-remem'",
                 id="save-repo-id-without-namespace"),
    pytest.param(lambda m, d: push_to_hub(m, "alice/vit/remem", token="hf_x"), ConfigError,
                 HUB_REPO_ID + r"'alice/vit/remem'", id="push-repo-id-two-slashes"),
    pytest.param(lambda m, d: push_to_hub(m, "alice/vit remem", token="hf_x"), ConfigError,
                 HUB_REPO_ID + r"'alice/vit remem'", id="push-repo-id-with-space"),
    pytest.param(lambda m, d: push_to_hub(m, "alice/--vit", token="hf_x"), ConfigError, HUB_REPO_ID + r"'alice/--vit'",
                 id="push-repo-id-double-dash"),
    pytest.param(lambda m, d: load_teacher("hf-hub:alice"), ConfigError, HUB_REPO_ID + r"'alice'",
                 id="load-hf-hub-without-namespace"),
    pytest.param(lambda m, d: load_teacher("hf-hub:alice/vit@v1", revision="v2"), ConfigError,
                 r"two revisions given: 'v1' in 'hf-hub:alice/vit@v1' and revision='v2'; keep one",
                 id="load-two-revisions"),
    pytest.param(lambda m, d: load_teacher(d / "nope"), ConfigError,
                 r"'.*nope' is not an existing folder: give a folder written by save_pretrained, 'local-dir:DIR', or "
                 r"'hf-hub:namespace/name'", id="load-missing-folder"),
    pytest.param(lambda m, d: save_pretrained(m, d, epoch=3), ConfigError,
                 r"unknown keyword arguments \['epoch'\]: the teacher metadata fields are \[.*'epochs'",
                 id="save-unknown-field"),
]


@hub_mark
@pytest.mark.parametrize(("call", "error", "match"), HUB_ID_CASES)
def test_hub_rejects_bad_names_before_doing_anything(call, error, match, teacher, tmp_path, monkeypatch):
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf_home")  # nothing may be contacted
    _raises(error, match, call, teacher, tmp_path)
    assert not any((tmp_path / name).exists() for name in ("config.json", "model.safetensors", "README.md"))


HUB_FOLDER_CASES = [
    pytest.param(lambda d: (d / "config.json").unlink(), HubError,
                 r"config\.json' is missing: a teacher folder holds config\.json and model\.safetensors.*"
                 r"write it with timm_remem\.save_pretrained", id="missing-config"),
    pytest.param(lambda d: (d / "model.safetensors").unlink(), CheckpointError,
                 r"model\.safetensors' is missing: .*never pickle files", id="missing-weights"),
    pytest.param(_drop_key, CheckpointError,
                 r"do not match the test_vit that its config\.json describes: missing keys "
                 r"\['blocks\.0\.mlp\.fc2\.bias'\]\. .*save the teacher again", id="missing-key"),
    pytest.param(_extra_key, CheckpointError,
                 r"unexpected keys \['head\.extra'\]\. The files come from different models",
                 id="extra-key"),
    pytest.param(lambda d: (d / "config.json").write_text("{not json"), CheckpointError,
                 r"config\.json' is not readable JSON \(.*\): the download is corrupt or the file was edited",
                 id="config-not-json"),
    pytest.param(lambda d: _truncate(d / "model.safetensors"), CheckpointError,
                 r"model\.safetensors' is unreadable \(.*\): it is corrupt or truncated; download or save it again",
                 id="truncated-weights"),
]


@hub_mark
@pytest.mark.parametrize(("damage", "error", "match"), HUB_FOLDER_CASES)
def test_load_teacher_reports_a_damaged_folder_and_leaves_it_alone(damage, error, match, saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / "teacher"))
    damage(folder)
    on_disk = _snapshot(folder)
    _raises(error, match, load_teacher, folder)
    assert _snapshot(folder) == on_disk


SAVE_OVER_CASES = [
    pytest.param(lambda: {"rho": -0.1}, ConfigError,
                 r"rho must be a finite number >= 0 \(the SAM radius, e\.g\. 0\.05\), got -0\.1", id="bad-metadata"),
    pytest.param(lambda: {"teacher_accuracy": 91.5}, ConfigError,
                 r"accuracies need the dataset they were measured on: pass dataset='\.\.\.' too",
                 id="accuracy-without-dataset"),
    pytest.param(lambda: {"model": torch.nn.Linear(2, 2)}, UnsupportedModelError,
                 r"expected a timm model \(built by timm\.create_model, which sets \.pretrained_cfg\), got Linear",
                 id="not-a-timm-model"),
]


@hub_mark
@pytest.mark.parametrize(("make_kwargs", "error", "match"), SAVE_OVER_CASES)
def test_failed_save_over_a_teacher_folder_keeps_it(make_kwargs, error, match, teacher, saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / "teacher"))
    on_disk = _snapshot(folder)
    kwargs = make_kwargs()
    model = kwargs.pop("model", teacher)
    _raises(error, match, lambda: save_pretrained(model, folder, **kwargs))
    assert _snapshot(folder) == on_disk
    assert get_scales(load_teacher(folder)) == pytest.approx(get_scales(teacher))


def _push_wrong_token(hub, model):
    push_to_hub(model, "alice/vit-remem", token="hf_wrong")


def _push_no_token(hub, model):
    push_to_hub(model, "alice/vit-remem")


def _load_missing_repo(hub, model):
    load_teacher("hf-hub:alice/nothing", token=ALICE_WRITE)


def _load_repo_without_config(hub, model):
    from huggingface_hub import HfApi

    HfApi(token=ALICE_WRITE).create_repo("alice/empty")
    load_teacher("hf-hub:alice/empty", token=ALICE_WRITE)


def _load_repo_without_weights(hub, model):
    from huggingface_hub import HfApi

    api = HfApi(token=ALICE_WRITE)
    api.create_repo("alice/no-weights")
    api.upload_file(path_or_fileobj=b'{"architecture": "test_vit", "num_classes": 5}', path_in_repo="config.json",
                    repo_id="alice/no-weights")
    load_teacher("hf-hub:alice/no-weights", token=ALICE_WRITE)


HUB_SERVER_CASES = [
    pytest.param(_push_wrong_token, HubError,
                 r"the Hub rejected the token \(401 Unauthorized\) for 'alice/vit-remem' on http.*: it is invalid, "
                 r"expired or revoked; pass token=\.\.\., set the HF_TOKEN environment variable", id="wrong-token"),
    pytest.param(_push_no_token, HubError,
                 r"pushing to 'alice/vit-remem' needs a Hugging Face token with the write role: pass token=\.\.\.",
                 id="no-token"),
    pytest.param(_load_missing_repo, HubError,
                 r"repository 'alice/nothing' on http.* was not found, or it is private and your token cannot see it: "
                 r"check the name", id="missing-repo"),
    pytest.param(_load_repo_without_config, HubError,
                 r"'alice/empty' on http.* has no config\.json: it is not a timm model repository",
                 id="repo-without-config"),
    pytest.param(_load_repo_without_weights, CheckpointError,
                 r"the Hub repository 'alice/no-weights' has no model\.safetensors: .*re-publish it with "
                 r"timm_remem\.push_to_hub", id="repo-without-weights"),
]


@hub_mark
@pytest.mark.parametrize(("call", "error", "match"), HUB_SERVER_CASES)
def test_hub_server_errors(call, error, match, hub, teacher):
    push_to_hub(teacher, "alice/vit-remem", token=ALICE_WRITE)
    published = dict(hub.repo("alice/vit-remem").branches)
    err = _raises(error, match, call, hub, teacher)
    assert err.__cause__ is None  # one message, not a stack of HTTP internals
    assert hub.repo("alice/vit-remem").branches == published  # what was published is still there
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(load_teacher("hf-hub:alice/vit-remem")(x), teacher(x), atol=1e-5, rtol=1e-5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections to it are refused


UNREACHABLE_CASES = [
    pytest.param(lambda m: push_to_hub(m, "alice/vit-remem", token=ALICE_WRITE),
                 r"cannot push to 'alice/vit-remem' on http://127\.0\.0\.1:\d+: the connection to the Hub failed "
                 r"\(ConnectError: .*\)\. Check the network connection, HF_ENDPOINT and proxy settings\. The push did "
                 r"not complete", id="push"),
    pytest.param(lambda m: load_teacher("hf-hub:alice/vit-remem"),
                 r"cannot reach the Hub at http://127\.0\.0\.1:\d+ to download 'alice/vit-remem', and it is not in the "
                 r"local cache: check the network connection.*HF_HUB_OFFLINE=1", id="load"),
]


@hub_mark
@pytest.mark.parametrize(("call", "match"), UNREACHABLE_CASES)
def test_unreachable_hub(call, match, teacher, tmp_path, monkeypatch):
    use_hub(monkeypatch, f"http://127.0.0.1:{_closed_port()}", tmp_path / "hf_home")
    no_retry_waits(monkeypatch)
    err = _raises(HubError, match, call, teacher)
    assert "Traceback" not in str(err) and err.__cause__ is None


# ============================================================================================== data


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def _not_an_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a JPEG")


def _empty_class_folders(root: Path):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    return create_dataset("folder", root)


def _all_images_unreadable(root: Path):
    _not_an_image(root / "cat" / "broken0.jpg")
    _not_an_image(root / "dog" / "broken1.jpg")
    return next(iter(create_loader(create_dataset("folder", root, img_size=8), batch_size=2)))


DATA_CASES = [
    pytest.param(lambda r: create_dataset("folder", r / "nope"), ConfigError,
                 r"dataset folder '.*nope' does not exist or is not a directory; pass the folder that holds the images "
                 r"as root/<class>/<image>", id="missing-folder"),
    pytest.param(lambda r: create_dataset("folder"), ConfigError,
                 r"dataset 'folder' reads images from a folder: pass root \(--data-dir\)", id="folder-without-root"),
    pytest.param(lambda r: create_dataset("folder", r), ConfigError,
                 r"dataset 'folder' at '.*' is empty: Found 0 images.*Put images in class sub-folders",
                 id="empty-folder"),
    pytest.param(_empty_class_folders, ConfigError, r"dataset 'folder' at '.*' is empty: Found 0 images",
                 id="empty-class-folders"),
    pytest.param(lambda r: create_dataset("imagenette"), ConfigError,
                 r"unknown dataset name 'imagenette'; use 'digits' \(offline\), 'folder' with root=<image folder>, "
                 r"'torch/<name>'", id="unknown-dataset-name"),
    pytest.param(lambda r: create_dataset("torch/cifar1000", r), ConfigError,
                 r"unknown torchvision dataset 'torch/cifar1000'; known: torch/cifar10, torch/cifar100",
                 id="unknown-torchvision-name"),
    pytest.param(lambda r: create_dataset("digits", split="tset"), ConfigError,
                 r"unknown split 'tset'; use one of \('train', 'training', 'val'", id="unknown-split"),
    pytest.param(lambda r: create_dataset("digits", img_size=4), ConfigError,
                 r"img_size must be an integer >= 8 \(the digits are 8x8 pixels\), got 4", id="digits-image-too-small"),
    pytest.param(lambda r: create_loader(create_dataset("digits", split="val", img_size=8), batch_size=0),
                 ConfigError, r"batch_size must be a positive integer, got 0", id="batch-size-zero"),
    pytest.param(_all_images_unreadable, ConfigError,
                 r"cannot read 2 images in a row \(.*broken[01]\.jpg.*\): they are corrupt or not images\. "
                 r"Delete or replace them", id="all-images-unreadable"),
]


@pytest.mark.parametrize(("call", "error", "match"), DATA_CASES)
def test_data_rejects(call, error, match, tmp_path):
    _raises(error, match, call, tmp_path)


def test_one_unreadable_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    _png(tmp_path / "cat" / "a.png", 40)
    _not_an_image(tmp_path / "cat" / "b.jpg")  # sorted between a.png and c.png
    _png(tmp_path / "dog" / "c.png", 200)
    dataset = create_dataset("folder", tmp_path, img_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    with caplog.at_level(logging.WARNING):
        images, targets, _ = next(iter(create_loader(dataset, batch_size=3)))
    assert re.search(r"Skipped sample \(index 1\)\. cannot identify image file .*b\.jpg", caplog.text)
    # The bad sample was replaced by the next readable one (the dog), the good ones are intact.
    assert targets.tolist() == [0, 1, 1]
    torch.testing.assert_close(images[:, 0, 0, 0], torch.tensor([40, 200, 200]) / 255.0)


# ============================================================================================== checkpoints


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CHECKPOINT_CASES = [
    pytest.param(lambda p: _truncate(p / "model.safetensors"), {}, CheckpointError,
                 r"checkpoint file '.*step-000000020/model\.safetensors' is truncated or altered: \d+ bytes, expected "
                 r"\d+; resume from an earlier checkpoint", id="truncated"),
    pytest.param(lambda p: _flip_byte(p / "model.safetensors"), {}, CheckpointError,
                 r"model\.safetensors' is corrupt: its sha256 does not match the manifest; resume from an earlier",
                 id="corrupt-byte"),
    pytest.param(lambda p: (p / "manifest.json").unlink(), {}, CheckpointError,
                 r"has no manifest\.json: the write did not finish \(crash or kill during save\); resume from an "
                 r"earlier complete checkpoint", id="killed-during-write"),
    pytest.param(lambda p: (p / "state.safetensors").unlink(), {}, CheckpointError,
                 r"checkpoint '.*step-000000020' is missing 'state\.safetensors'; resume from an earlier",
                 id="file-deleted"),
    pytest.param(lambda p: (p / "manifest.json").write_text("{"), {}, CheckpointError,
                 r"manifest\.json' is corrupt \(.*\); resume from an earlier checkpoint", id="manifest-corrupt"),
    pytest.param(lambda p: _truncate(p / "model.safetensors"), {"verify": False}, CheckpointError,
                 r"model\.safetensors' is unreadable \(.*\); it is corrupt or truncated: resume from an earlier "
                 r"checkpoint \(list them with timm_remem\.checkpoint\.list_checkpoints\)", id="truncated-unverified"),
    pytest.param(lambda p: (p / "state.json").write_text("{"), {"verify": False}, CheckpointError,
                 r"state\.json' is unreadable \(.*\); resume from an earlier one", id="state-json-corrupt-unverified"),
]


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints at steps 10 and 20 of a model with different weights; returns (root, first, second, weights)."""
    model = torch.nn.Linear(4, 3)
    weights = []
    for step, seed in ((10, 1), (20, 2)):
        torch.manual_seed(seed)
        model.reset_parameters()
        weights.append(copy.deepcopy(model.state_dict()))
        save_checkpoint(tmp_path, model=model, epoch=step // 10, step=step, keep_last=None)
    return tmp_path, tmp_path / "step-000000010", tmp_path / "step-000000020", weights


@pytest.mark.parametrize(("damage", "load_kwargs", "error", "match"), CHECKPOINT_CASES)
def test_damaged_checkpoint_is_detected_and_the_previous_one_still_loads(damage, load_kwargs, error, match,
                                                                         two_checkpoints):
    _, first, second, weights = two_checkpoints
    on_disk = _snapshot(first)
    damage(second)
    _raises(error, match, load_checkpoint, second, model=torch.nn.Linear(4, 3), **load_kwargs)
    assert _snapshot(first) == on_disk
    model = torch.nn.Linear(4, 3)
    assert load_checkpoint(first, model=model).step == 10
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[0][name]), name


def test_resume_from_the_run_folder_skips_a_damaged_newest_checkpoint(two_checkpoints, caplog):
    root, _, second, weights = two_checkpoints
    _truncate(second / "model.safetensors")
    model = torch.nn.Linear(4, 3)
    with caplog.at_level(logging.WARNING, logger="timm_remem.checkpoint"):
        info = load_checkpoint(root, model=model)
    assert re.search(r"skipping damaged checkpoint: checkpoint file .*step-000000020/model\.safetensors' is "
                     r"truncated", caplog.text)
    assert info.step == 10 and all(torch.equal(v, weights[0][k]) for k, v in model.state_dict().items())


def _load_with_every_checkpoint_damaged(root: Path):
    for path in root.glob("step-*"):
        _truncate(path / "model.safetensors")
    return load_checkpoint(root, model=torch.nn.Linear(4, 3))


CHECKPOINT_MISUSE_CASES = [
    pytest.param(lambda root: load_checkpoint(root / "step-000000010", model=torch.nn.Linear(4, 5)),
                 r"the model in checkpoint '.*step-000000010' does not match the model it is loaded into: shape "
                 r"mismatch \['weight: checkpoint \(3, 4\) vs model \(5, 4\)'.*Build it with the configuration saved",
                 id="wrong-model"),
    pytest.param(lambda root: load_checkpoint(root / "runs" / "missing", model=torch.nn.Linear(4, 3)),
                 r"checkpoint '.*missing' does not exist; check the --resume path", id="missing-path"),
    pytest.param(_load_with_every_checkpoint_damaged,
                 r"every checkpoint in '.*' is damaged; nothing to resume from", id="all-damaged"),
    pytest.param(lambda root: save_checkpoint(root, model=torch.nn.Linear(4, 3), step=30, metrics={"loss": NAN}),
                 r"config and metrics must be JSON data \(no NaN/inf, no objects\)", id="save-nan-metric"),
]


@pytest.mark.parametrize(("call", "match"), CHECKPOINT_MISUSE_CASES)
def test_checkpoint_misuse(call, match, two_checkpoints):
    root, first, _, _ = two_checkpoints
    _raises(CheckpointError, match, call, root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000000010", "step-000000020"]  # nothing added or pruned


# ============================================================================================== CLI


@pytest.fixture
def cli_main(monkeypatch):
    """``timm_remem.cli.main`` (every sub-command is registered by the package itself)."""
    return cli.main


VIT = ["--model-kwargs", '{"img_size": 32}']

CLI_CASES = [
    pytest.param(["inspect", "test_vit", "--bogus"], r"timm-remem: error: unrecognized arguments: --bogus",
                 id="unknown-flag"),
    pytest.param(["fnetune"], r"argument COMMAND: invalid choice: 'fnetune' \(choose from .*'inspect'",
                 id="unknown-command"),
    pytest.param([], r"usage: timm-remem .*COMMAND", id="no-command"),
    pytest.param(["inspect", "test_vit", "--alpha", "abc"], r"argument --alpha: invalid float value: 'abc'",
                 id="flag-wrong-type"),
    pytest.param(["inspect", "no_such_model"],
                 r"timm-remem inspect: error: unknown timm model 'no_such_model': see timm\.list_models",
                 id="inspect-unknown-model"),
    pytest.param(["inspect", "test_resnet"],
                 r"timm-remem inspect: error: ResNet has no transformer MLP residual branch", id="inspect-convnet"),
    pytest.param(["inspect", "test_vit", *VIT, "--top-k", "9"],
                 r"timm-remem inspect: error: top_k=9 is out of range: .*1 <= top_k <= 6",
                 id="inspect-top-k-too-large"),
    pytest.param(["inspect", "test_vit", "--model-kwargs", "{img_size: 32}"],
                 r"timm-remem inspect: error: --model-kwargs is not valid JSON \(.*\): pass e\.g\.",
                 id="inspect-model-kwargs-not-json"),
    pytest.param(["inspect", "test_vit", "--model-kwargs", '{"img_sz": 32}'],
                 r"timm-remem inspect: error: .*'img_sz'",
                 id="inspect-model-kwargs-unknown-argument"),
    pytest.param(["push", "{tmp}/nope", "alice/vit-remem"],
                 r"timm-remem push: error: '.*nope' is not an existing folder", id="push-missing-folder"),
    pytest.param(["push", "{saved}", "alice/vit remem"],
                 r"timm-remem push: error: .*repo_id must be 'namespace/name'.*got 'alice/vit remem'",
                 id="push-bad-repo-id"),
    pytest.param(["finetune", "--model", "no_such_model", "--output", "{tmp}/run"],
                 r"timm-remem finetune: error: unknown timm model 'no_such_model'; list names with timm\.list_models",
                 id="finetune-unknown-model"),
    pytest.param(["finetune", "--model", "test_vit", "--top-k", "2", "--output", "{tmp}/run"],
                 r"timm-remem finetune: error: top_k and learnable configure reweighting: also pass alpha",
                 id="finetune-top-k-without-alpha"),
    pytest.param(["finetune", "--model", "test_vit", "--adaptive", "--output", "{tmp}/run"],
                 r"timm-remem finetune: error: adaptive=True \(ASAM\) needs rho > 0",
                 id="finetune-adaptive-without-rho"),
    pytest.param(["finetune", "--model", "test_vit", "--rho", "0.1", "--opt", "lamb", "--output", "{tmp}/run"],
                 r"timm-remem finetune: error: SAM \(rho=0\.1\) wraps sgd, momentum, adam or adamw; got "
                 r"optimizer='lamb'", id="finetune-sam-with-unsupported-optimizer"),
    pytest.param(["finetune", "--model", "test_vit", "--save-at", "5", "--epochs", "2", "--output", "{tmp}/run"],
                 r"timm-remem finetune: error: save_at epochs \[5\] are outside 1\.\.epochs=2",
                 id="finetune-save-at-after-end"),
    pytest.param(["finetune", "--model", "test_vit", "--model-kwargs", "[32]"],
                 r"argument --model-kwargs: --model-kwargs must be a JSON object such as",
                 id="finetune-model-kwargs-list"),
    pytest.param(["distill", "--model", "test_resnet", "--cache-teacher", "on", "--mixup", "0.2", "--output",
                  "{tmp}/run"],
                 r"timm-remem distill: error: cache_teacher=True needs deterministic inputs, but augment/mixup/cutmix "
                 r"are on", id="distill-cache-teacher-with-mixup"),
    pytest.param(["distill", "--model", "test_resnet", "--method", "soft"],
                 r"argument --method: invalid choice: 'soft' \(choose from .*kd", id="distill-unknown-method"),
]


@pytest.mark.parametrize(("argv", "match"), CLI_CASES)
def test_cli_rejects(argv, match, cli_main, capsys, tmp_path, monkeypatch, saved):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here, never in the repository
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf_home")  # no token, nothing reachable
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{saved}", str(saved)) for a in argv]
    try:
        code = cli_main(argv)
    except SystemExit as exit_:  # argparse's own errors (unknown flag, bad value) exit with status 2
        code = exit_.code
    captured = capsys.readouterr()
    assert code not in (0, None)
    assert re.search(match, captured.err, re.DOTALL), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ============================================================================================== the table


def _module_case_ids(namespace: dict) -> set[str]:
    """``test_name[case id]`` (or ``test_name``) of every test function in one module's namespace."""
    ids = set()
    for name, fn in namespace.items():
        if not name.startswith("test_") or name == "test_docs_table_lists_exactly_these_cases" or not callable(fn):
            continue
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            ids.add(name)
        for mark in marks:
            ids.update(f"{name}[{p.id}]" for p in mark.args[1])
    return ids


def _case_ids() -> set[str]:
    """Every case of this module and of the per-room modules ``tests/bad_input/test_bad_*.py``."""
    ids = _module_case_ids(globals())
    for path in sorted(BAD_INPUT_DIR.glob("test_bad_*.py")):
        spec = importlib.util.spec_from_file_location(f"_bad_input_table_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        clash = ids & _module_case_ids(vars(module))
        assert not clash, f"test ids {sorted(clash)} appear in two bad-input modules; rename one"
        ids |= _module_case_ids(vars(module))
    return ids


def test_docs_table_lists_exactly_these_cases():
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    documented = [m.group(1) for line in rows for m in [re.search(r"`(test_\w+(?:\[[^\]]+\])?)`\s*\|\s*$", line)]
                  if m]
    assert len(documented) == len(set(documented)), "a test id appears twice in docs/bad-input.md"
    assert set(documented) == _case_ids()
    assert len(documented) >= 36
