"""teacher_information, information_plane and rank_checkpoints on synthetic teachers whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from scipy import integrate, stats
from torch import nn

from timm_remem.analysis.information import (
    information_from_features,
    information_plane,
    rank_checkpoints,
    teacher_information,
)
from timm_remem.errors import CheckpointError, ConfigError
from timm_remem.hub import save_pretrained


class CopyTeacher(nn.Module):
    """A 'teacher' whose logits are a copy of (some columns of) its input: F = X[:, keep] * scale."""

    def __init__(self, keep: list[int] | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.keep = keep
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.scale
        if self.keep is not None:
            out = torch.zeros_like(out).index_copy(1, torch.tensor(self.keep), out[:, self.keep])
        return out


def batches(x: torch.Tensor, y: torch.Tensor | None = None, size: int = 500) -> list:
    out = []
    for i in range(0, len(x), size):
        out.append(x[i : i + size] if y is None else (x[i : i + size], y[i : i + size]))
    return out


def gaussian_channel_mi(variances: torch.Tensor, sigma: float, s2: float) -> float:
    """Ground truth I(F; F + sigma*sqrt(s2)*Z) for F ~ N(0, diag(variances))."""
    return float(0.5 * torch.log1p(variances / (sigma**2 * s2)).sum())


LAM = torch.tensor([4.0, 1.0, 0.25])


def gaussian_inputs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * LAM.sqrt()


def test_gaussian_copy_teacher_matches_channel_capacity():
    x = gaussian_inputs(6000)
    info = teacher_information(CopyTeacher(scale=3.0), batches(x), noise=0.5, progress=False)
    truth = gaussian_channel_mi(LAM, 0.5, float(LAM.mean()))  # noise is relative: the 3x scale cancels
    assert info.i_xf == pytest.approx(truth, rel=0.03)
    assert info.n == 6000 and info.dim == 3
    assert info.i_fy is None and info.accuracy is None


def test_ksg_copy_teacher_close_to_truth():
    # one dimension: KSG is nearly unbiased there (it is biased downwards for high MI in many dimensions)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 1, generator=g) * 2.0
    info = teacher_information(CopyTeacher(), batches(x), noise=0.8, method="ksg", progress=False)
    assert info.i_xf == pytest.approx(gaussian_channel_mi(torch.tensor([4.0]), 0.8, 4.0), rel=0.07)


def test_more_noise_means_less_information():
    x = gaussian_inputs(2000, seed=2)
    low = information_from_features(x, noise=0.1)["i_xf"]
    high = information_from_features(x, noise=1.0)["i_xf"]
    assert low > high + 2.0


@pytest.fixture(scope="module")
def mixture():
    """Y uniform in {0, 1}; X | Y ~ N((2Y - 1) * mu * e1, I_2)."""
    mu, n = 1.0, 2000
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g)
    x[:, 0] += (2 * y - 1) * mu
    return mu, x, y


def mixture_truth(mu: float, sigma: float) -> tuple[float, float]:
    """(I(T; Y), I(X; T | Y)) for T = X + sigma * s * Z, by numerical integration / closed form."""
    s2 = (1 + mu**2 + 1) / 2  # mean per-dimension variance of X
    v = 1 + sigma**2 * s2  # variance of T1 given Y

    def p(t: float) -> float:
        return 0.5 * stats.norm.pdf(t, mu, math.sqrt(v)) + 0.5 * stats.norm.pdf(t, -mu, math.sqrt(v))

    h_t = integrate.quad(lambda t: -p(t) * math.log(p(t)), -40, 40)[0]
    i_ty = h_t - 0.5 * math.log(2 * math.pi * math.e * v)
    i_xt_given_y = 2 * 0.5 * math.log1p(1 / (sigma**2 * s2))  # X | Y ~ N(., I_2): a Gaussian channel
    return i_ty, i_xt_given_y


def test_label_information_matches_numerical_integral(mixture):
    mu, x, y = mixture
    i_ty, i_cond = mixture_truth(mu, 0.5)
    info = teacher_information(CopyTeacher(), batches(x, y), noise=0.5, method="ksg", progress=False)
    assert info.i_fy == pytest.approx(i_ty, rel=0.07)
    assert info.h_y == pytest.approx(float(stats.entropy(np.bincount(y.numpy()))), abs=1e-9)
    # chain rule: I(X;T|Y) = I(X;T) - I(T;Y) for a teacher (Y -> X -> T), compared with the closed form
    assert info.i_xf_given_y == pytest.approx(i_cond, rel=0.05)


def test_classwise_conditional_matches_closed_form(mixture):
    mu, x, y = mixture
    _, i_cond = mixture_truth(mu, 0.5)
    info = teacher_information(
        CopyTeacher(), batches(x, y), noise=0.5, conditional="classwise", method="gaussian", progress=False
    )
    assert info.i_xf_given_y == pytest.approx(i_cond, rel=0.03)


def test_label_information_never_exceeds_label_entropy():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(40, 8, generator=g)
    y = torch.arange(40) % 10  # 10 classes, 4 samples each: the Gaussian estimate overshoots H(Y) here
    out = information_from_features(f, y, noise=0.1)
    assert out["i_fy"] <= math.log(10) + 1e-12


@pytest.fixture(scope="module")
def vit_and_data():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4).eval()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 4, (24,), generator=g)) for _ in range(3)]
    return model, data


def test_timm_teacher_accuracy_and_feature_choice(vit_and_data):
    model, data = vit_and_data
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data)
    info = teacher_information(model, data, progress=False)
    assert info.accuracy == pytest.approx(correct / 72)
    assert info.error == pytest.approx(1 - correct / 72)
    assert info.dim == 4 and info.n == 72
    pre = teacher_information(model, data, features="pre_logits", max_dim=8, max_samples=50, progress=False)
    assert pre.dim == 8 and pre.n == 50 and pre.features == "pre_logits"


def test_zero_noise_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="infinite"):
        information_from_features(torch.randn(50, 2), noise=0.0)


def test_mismatched_labels_are_refused():
    with pytest.raises(ConfigError, match=r"labels must have shape \[50\]"):
        information_from_features(torch.randn(50, 2), torch.zeros(49, dtype=torch.long))


def test_information_plane_reads_checkpoint_folders(vit_and_data, tmp_path):
    model, data = vit_and_data
    other = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4).eval()
    for name, m in (("ep2", model), ("ep10", other)):
        timm.models.save_for_hf(m, tmp_path / name, model_args={"img_size": 32}, safe_serialization=True)
    points = information_plane(tmp_path, data, progress=False)
    assert [p.name for p in points] == ["ep2", "ep10"]  # natural order, not lexicographic
    direct = teacher_information(model, data, progress=False)
    assert points[0].i_xf == pytest.approx(direct.i_xf, rel=1e-6)
    assert points[0].accuracy == direct.accuracy


def test_information_plane_refuses_missing_folder(tmp_path, vit_and_data):
    with pytest.raises(CheckpointError, match="holds no teacher checkpoints"):
        information_plane(tmp_path, vit_and_data[1], progress=False)


def test_rank_checkpoints_by_mi_prefers_more_informative_outputs():
    x = gaussian_inputs(1500, seed=6)
    y = x.argmax(1)
    teachers = {"one_dim": CopyTeacher(keep=[0]), "all": CopyTeacher(), "two_dims": CopyTeacher(keep=[0, 1])}
    ranking = rank_checkpoints(teachers, batches(x, y), score="mi", noise=0.3, progress=False)
    assert [r.name for r in ranking] == ["all", "two_dims", "one_dim"]
    assert [r.rank for r in ranking] == [1, 2, 3]


def test_rank_checkpoints_combined_score_is_sum_of_zscores():
    x = gaussian_inputs(1500, seed=7)
    y = x.argmax(1)
    teachers = {"one_dim": CopyTeacher(keep=[0]), "all": CopyTeacher(), "two_dims": CopyTeacher(keep=[0, 1])}
    ranking = rank_checkpoints(teachers, batches(x, y), noise=0.3, mi_weight=0.5, progress=False)
    acc = np.array([r.info.accuracy for r in ranking])
    mi = np.array([r.info.i_xf for r in ranking])
    expected = (acc - acc.mean()) / acc.std() + 0.5 * (mi - mi.mean()) / mi.std()
    np.testing.assert_allclose([r.score for r in ranking], expected, rtol=1e-9)
    assert list(np.argsort(-expected)) == [0, 1, 2]


def test_rank_checkpoints_needs_labels_for_combined_score():
    x = gaussian_inputs(200)
    with pytest.raises(ConfigError, match="needs labels"):
        rank_checkpoints([CopyTeacher(), CopyTeacher(keep=[0])], batches(x), progress=False)


def test_checkpoint_lister_skips_half_written_exports_and_reads_run_folders(tmp_path):
    # information_plane and rank_checkpoints list a folder's checkpoints with the teacher-source service
    from timm_remem.teachers import list_exports as _checkpoint_dirs

    run = tmp_path / "run"
    for name in ("epoch-010", "epoch-002", ".tmp-epoch-012-abc", ".old-epoch-002", "notes"):
        folder = run / "checkpoints" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        if name != "notes":
            (folder / "model.safetensors").write_bytes(b"")
    (run / "config.json").write_text("{}")  # a finetune run folder has its own config.json, but no weights
    assert [p.name for p in _checkpoint_dirs(run)] == ["epoch-002", "epoch-010"]
    assert [p.name for p in _checkpoint_dirs(run / "checkpoints")] == ["epoch-002", "epoch-010"]
    assert _checkpoint_dirs(run / "checkpoints" / "epoch-002") == [run / "checkpoints" / "epoch-002"]


# --- checkpoints that expect other normalisations than the loader's (issue 12 item 4) ----------------------------

def _two_normalisations(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=3)
    other = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=3)
    other.load_state_dict(model.state_dict())
    other.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    save_pretrained(model, tmp_path / "ckpts" / "a")
    save_pretrained(other, tmp_path / "ckpts" / "b")
    pixels = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(2))

    def normalised(mean, std):
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        return [((pixels - m) / s, labels)]

    return model, other, normalised


def test_information_plane_renormalises_each_checkpoint_to_its_own_mean_and_std(tmp_path):
    model, other, normalised = _two_normalisations(tmp_path)
    mean_a, std_a = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    loader = normalised(mean_a, std_a)  # normalised for checkpoint a only
    points = information_plane(tmp_path / "ckpts", loader, progress=False, data_mean=mean_a, data_std=std_a)
    # reference: each checkpoint measured on images normalised exactly as it expects
    ref_a = teacher_information(model, normalised(mean_a, std_a), progress=False)
    ref_b = teacher_information(other, normalised((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), progress=False)
    assert points[0].i_xf == pytest.approx(ref_a.i_xf, rel=1e-4)
    assert points[1].i_xf == pytest.approx(ref_b.i_xf, rel=1e-4)
    assert points[1].accuracy == ref_b.accuracy


def test_information_plane_refuses_mixed_normalisations_when_the_loaders_is_unknown(tmp_path):
    model, _, normalised = _two_normalisations(tmp_path)
    with pytest.raises(ConfigError, match=r"expect different input normalisations .*pass data_mean= and data_std="):
        information_plane(tmp_path / "ckpts", normalised(model.pretrained_cfg["mean"], model.pretrained_cfg["std"]),
                          progress=False)
    with pytest.raises(ConfigError, match="pass data_mean and data_std together"):
        rank_checkpoints(tmp_path / "ckpts", [], progress=False, data_mean=(0.5, 0.5, 0.5))
