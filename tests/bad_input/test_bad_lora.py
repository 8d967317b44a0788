"""Bad input to the LoRA path (``timm_remem.lora``, ``finetune_teacher(lora_rank=...)``, ``--lora-rank``): one clear
error each.

Each case checks the exception's exact type and the quoted part of its message; "kept" cases also check that the
model (its modules and weights) or the run's checkpoint files are what they were before the failure.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_remem.cli as cli
from timm_remem import CheckpointError, ConfigError, TrainingError, UnsupportedModelError
from timm_remem.lora import PeftMissingError, apply_lora, merge_lora
from timm_remem.train import FinetuneConfig, finetune_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def _raises(error, match, call, *args, **kwargs):
    with pytest.raises(error, match=f"(?s){match}") as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)


def _eva() -> torch.nn.Module:
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, embed_dim=32, depth=2,
                             num_heads=2, num_classes=5)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ apply_lora
_APPLY = [
    pytest.param(lambda m: apply_lora(m, 0), ConfigError,
                 r"lora_rank must be a positive integer, got 0; LoRA ranks are typically 4 to 64", id="rank-zero"),
    pytest.param(lambda m: apply_lora(m, -4), ConfigError, r"lora_rank must be a positive integer, got -4",
                 id="rank-negative"),
    pytest.param(lambda m: apply_lora(m, 2.5), ConfigError, r"lora_rank must be a positive integer, got 2\.5",
                 id="rank-float"),
    pytest.param(lambda m: apply_lora(m, True), ConfigError, r"lora_rank must be a positive integer, got True",
                 id="rank-bool"),
    pytest.param(lambda m: apply_lora(m, 4, alpha=0), ConfigError,
                 r"lora_alpha must be a finite number > 0 or None, got 0; peft's default is 8; unset means "
                 r"alpha = rank", id="alpha-zero"),
    pytest.param(lambda m: apply_lora(m, 4, alpha=-8), ConfigError,
                 r"lora_alpha must be a finite number > 0 or None, got -8", id="alpha-negative"),
    pytest.param(lambda m: apply_lora(m, 4, alpha=float("nan")), ConfigError,
                 r"lora_alpha must be a finite number > 0 or None, got nan", id="alpha-nan"),
    pytest.param(lambda m: apply_lora(m, 4, dropout=1.0), ConfigError,
                 r"lora_dropout must be a finite number in \[0, 1\), got 1\.0", id="dropout-one"),
    pytest.param(lambda m: apply_lora(m, 4, dropout=-0.1), ConfigError,
                 r"lora_dropout must be a finite number in \[0, 1\), got -0\.1", id="dropout-negative"),
    pytest.param(lambda m: apply_lora(m, 4, targets="qkv"), ConfigError,
                 r"lora_targets must be a list of Linear-layer names such as \['qkv', 'fc1'\], got 'qkv'",
                 id="targets-string"),
    pytest.param(lambda m: apply_lora(m, 4, targets=[]), ConfigError,
                 r"lora_targets is empty; name at least one Linear layer", id="targets-empty"),
    pytest.param(lambda m: apply_lora(m, 4, targets=["qkv", "fc3"]), ConfigError,
                 r"lora_targets \['fc3'\] match no Linear layer of VisionTransformer; its Linear layers are named "
                 r"\['fc1', 'fc2', 'proj', 'qkv'\] \(e\.g\. 'blocks\.0\.attn\.qkv'\); did you mean \['fc1', 'fc2'\]\?",
                 id="target-unknown"),
    pytest.param(lambda m: apply_lora(m, 4, targets=["head"]), ConfigError,
                 r"lora_targets \['head'\] name the classifier head of VisionTransformer, which trains fully and "
                 r"takes no adapter", id="target-head"),
    pytest.param(lambda m: apply_lora(_eva(), 4, targets=["qkv", "fc1"]), ConfigError,
                 r"lora_targets \['qkv'\] include layers that Eva's forward never calls .*reads their weight "
                 r"directly.*drop them from lora_targets", id="target-read-by-weight"),
    pytest.param(lambda m: apply_lora(timm.create_model("test_resnet", pretrained=False), 4), UnsupportedModelError,
                 r"ResNet has no transformer MLP residual branch", id="resnet-no-mlp"),
    pytest.param(lambda m: apply_lora(timm.create_model("test_convnext", pretrained=False), 4),
                 UnsupportedModelError, r"ConvNeXt has no transformer MLP residual branch", id="convnext-no-mlp"),
    pytest.param(lambda m: apply_lora("vit_base_patch16_224", 4), UnsupportedModelError,
                 r"apply_lora needs a timm model \(a torch\.nn\.Module\), got str", id="model-name"),
    pytest.param(lambda m: apply_lora(apply_lora(m, 2), 4), ConfigError,
                 r"VisionTransformer already holds peft adapters; train those, or fold them first with "
                 r"timm_remem\.lora\.merge_lora\(model\)", id="already-adapted"),
]


@pytest.mark.filterwarnings("ignore:apply_lora.*never called:UserWarning")
@pytest.mark.parametrize(("call", "error", "match"), _APPLY)
def test_lora_rejects(call, error, match):
    model = _vit()
    _raises(error, match, call, model)


def test_lora_rejects_unknown_target_and_keeps_the_model():
    model = _vit()
    before = _state(model)
    _raises(ConfigError, r"match no Linear layer", apply_lora, model, 4, targets=["mlp.fc3"])
    assert _same(_state(model), before) and all(type(m).__module__.split(".")[0] != "peft" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


# --------------------------------------------------------------------------------------------------- peft missing
@pytest.fixture
def no_peft(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed


_NO_PEFT = [
    pytest.param(lambda: apply_lora(_vit(), 4), id="apply-lora"),
    pytest.param(lambda: finetune_teacher(model="test_vit", img_size=16, epochs=1, lora_rank=4, progress=False,
                                          output="never-written"), id="finetune"),
]


@pytest.mark.parametrize("call", _NO_PEFT)
def test_lora_without_peft_rejects(call, no_peft, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = _raises(PeftMissingError, r"LoRA fine-tuning \(lora_rank / --lora-rank\) needs peft, which is not "
                                      r"installed: pip install timm-remem\[lora\]", call)
    assert isinstance(error, ImportError) and isinstance(error, ConfigError)


def test_lora_without_peft_cli_prints_one_line(no_peft, tmp_path, capsys):
    code = cli.main(["finetune", "--model", "test_vit", "--img-size", "16", "--epochs", "1", "--lora-rank", "4",
                     "--no-progress", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.endswith("needs peft, which is not installed: pip install timm-remem[lora]"), err


# ---------------------------------------------------------------------------------------------------- merge_lora
def _nan_adapter():
    model = apply_lora(_vit(), 2)
    with torch.no_grad():
        model.blocks[3].mlp.fc2.lora_B["default"].weight[0, 0] = float("inf")
    return model


_MERGE = [
    pytest.param(_vit, ConfigError,
                 r"merge_lora: VisionTransformer holds no peft LoRA adapter; nothing to merge", id="not-adapted"),
    pytest.param(_nan_adapter, TrainingError,
                 r"merge_lora: the adapters of \['blocks\.3\.mlp\.fc2'\] hold NaN or infinite weights; nothing was "
                 r"merged", id="non-finite-adapter"),
]


@pytest.mark.parametrize(("build", "error", "match"), _MERGE)
def test_lora_merge_rejects(build, error, match):
    model = build()
    before, modules = _state(model), [type(m) for m in model.modules()]
    _raises(error, match, merge_lora, model)
    assert _same(_state(model), before) and [type(m) for m in model.modules()] == modules  # kept


# ------------------------------------------------------------------------------------------------ FinetuneConfig
_CONFIG = [
    pytest.param({"lora_rank": 0}, r"lora_rank must be a positive integer or None, got 0", id="rank-zero"),
    pytest.param({"lora_alpha": 16}, r"lora_alpha, lora_dropout and lora_targets configure LoRA: also pass "
                                     r"lora_rank \(e\.g\. 8\)", id="alpha-without-rank"),
    pytest.param({"lora_targets": ["qkv"]}, r"configure LoRA: also pass lora_rank", id="targets-without-rank"),
    pytest.param({"lora_rank": 8, "lora_dropout": 1.5}, r"lora_dropout must be a finite number in \[0, 1\), got 1\.5",
                 id="dropout-too-large"),
    pytest.param({"lora_rank": 8, "lora_targets": ["qkv", ""]}, r"lora_targets must be a list of Linear-layer "
                                                                r"names .*bad entries: \[''\]", id="targets-blank"),
]


@pytest.mark.parametrize(("kwargs", "match"), _CONFIG)
def test_lora_config_rejects(kwargs, match):
    _raises(ConfigError, match, FinetuneConfig, model="test_vit", **kwargs)


def test_lora_cli_rejects_rank_zero(tmp_path, capsys):
    code = cli.main(["finetune", "--model", "test_vit", "--lora-rank", "0", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "lora_rank must be a positive integer or None, got 0" in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- finetune and resume
RUN = dict(model="test_vit", img_size=16, epochs=1, batch_size=32, limit_train_batches=1, progress=False,
           save_at=[], lora_rank=2)


def test_lora_finetune_rejects_unknown_target(tmp_path):
    _raises(ConfigError, r"lora_targets \['fc3'\] match no Linear layer of VisionTransformer",
            finetune_teacher, **dict(RUN, lora_targets=["fc3"]), output=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "train-state").exists()


def test_lora_finetune_rejects_model_without_mlp(tmp_path):
    _raises(UnsupportedModelError, r"ResNet has no transformer MLP residual branch",
            finetune_teacher, **dict(RUN, model="test_resnet"), output=str(tmp_path / "run"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-runs")
    finetune_teacher(**RUN, output=str(root / "lora"))
    finetune_teacher(**dict(RUN, lora_rank=None), output=str(root / "full"))
    return root


_RESUME = [
    pytest.param("lora", {"lora_rank": 4}, r"lora_rank: 2 -> 4", id="other-rank"),
    pytest.param("lora", {"lora_rank": None}, r"lora_rank: 2 -> unset", id="without-rank"),
    pytest.param("lora", {"lora_alpha": 8.0}, r"lora_alpha: unset -> 8\.0", id="other-alpha"),
    pytest.param("full", {"lora_rank": 4}, r"lora_rank: unset -> 4", id="full-run-with-rank"),
]


@pytest.mark.parametrize(("name", "change", "match"), _RESUME)
def test_lora_resume_rejects(runs, name, change, match):
    folder = runs / name
    before = _snapshot(folder)
    _raises(CheckpointError, r"was written by a run with other settings \(saved -> now\):.*" + match
            + r".*Resume with the same settings", finetune_teacher, **dict(RUN, **change), output=str(folder),
            resume=True)
    after = _snapshot(folder)
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items()
                                                                      if k != "config.json"}  # checkpoints kept

