"""Sharpness: SAM's loss increase and the Hessian's top eigenvalue, against closed forms, finite differences and dense
Hessians; the model left exactly as it was (also when a forward raises); bad inputs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_remem
from timm_remem.analysis import (
    SAMSharpness,
    Sharpness,
    TopEigenvalue,
    hessian_top_eigenvalue,
    measure_sharpness,
    sam_sharpness,
)
from timm_remem.analysis.sharpness import _hvp
from timm_remem.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------------------------
# A quadratic with closed forms: the model returns its parameter w, the loss is s/2 (w - c)^T A (w - c) with s the
# mean of the batch's labels (1 unless a test scales batches differently).

DIM = 6


class Quadratic(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def quadratic_loss(a: np.ndarray, c: np.ndarray):
    a_t, c_t = torch.from_numpy(a), torch.from_numpy(c)

    def loss_fn(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = w - c_t
        return 0.5 * y.to(w.dtype).mean() * (d @ a_t @ d)

    return loss_fn


def spd_matrix(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((DIM, DIM))
    return m @ m.T + DIM * np.eye(DIM)


def quadratic_problem(seed: int = 0, a: np.ndarray | None = None):
    rng = np.random.default_rng(seed + 100)
    a = spd_matrix(seed) if a is None else a
    c, w = rng.standard_normal(DIM), rng.standard_normal(DIM)
    return Quadratic(torch.from_numpy(w)), quadratic_loss(a, c), a, c, w


def batch(n: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, dtype=torch.float64), torch.full((n,), scale, dtype=torch.float64)


def sam_increase_closed_form(a: np.ndarray, c: np.ndarray, w: np.ndarray, rho: float, s: float = 1.0) -> float:
    """s/2 [(d + e)^T A (d + e) - d^T A d] with e = rho g / ||g||, g = s A d: rho ||g|| + s rho^2 g^T A g / 2||g||^2."""
    g = s * a @ (w - c)
    gn = np.linalg.norm(g)
    return rho * gn + 0.5 * s * rho**2 * (g @ a @ g) / gn**2


@pytest.mark.parametrize("rho", [0.05, 0.5, 2.0])
def test_sam_increase_matches_the_closed_form_of_a_quadratic(rho):
    model, loss_fn, a, c, w = quadratic_problem(seed=1)
    result = sam_sharpness(model, [batch(3), batch(5)], loss_fn=loss_fn, rho=rho)
    expected = sam_increase_closed_form(a, c, w, rho)
    assert isinstance(result, SAMSharpness)
    assert result.per_batch == pytest.approx([expected, expected], rel=1e-6)
    assert result.increase == pytest.approx(expected, rel=1e-6)
    assert result.loss == pytest.approx(0.5 * (w - c) @ a @ (w - c), rel=1e-6)
    assert result.num_samples == 8


def test_sam_increase_is_perturbed_per_batch_and_averaged_over_batches():
    model, loss_fn, a, c, w = quadratic_problem(seed=2)
    scales, sizes = [0.5, 1.0, 3.0], [2, 7, 3]
    result = sam_sharpness(model, [batch(n, s) for n, s in zip(sizes, scales, strict=True)], loss_fn=loss_fn, rho=0.1)
    expected = [sam_increase_closed_form(a, c, w, 0.1, s) for s in scales]
    assert result.per_batch == pytest.approx(expected, rel=1e-6)
    assert result.increase == pytest.approx(np.mean(expected), rel=1e-6)  # each batch counts once
    q = 0.5 * (w - c) @ a @ (w - c)
    assert result.loss == pytest.approx(sum(n * s * q for n, s in zip(sizes, scales, strict=True)) / 12, rel=1e-6)


def test_top_eigenvalue_of_a_quadratic_is_the_largest_eigenvalue_of_a():
    model, loss_fn, a, _, _ = quadratic_problem(seed=3)
    top = hessian_top_eigenvalue(model, [batch(4)], loss_fn=loss_fn, iters=500, tol=1e-10)
    assert isinstance(top, TopEigenvalue)
    assert top.converged and 2 <= top.iterations < 500
    assert top.value == pytest.approx(np.linalg.eigvalsh(a).max(), rel=1e-6)


def test_top_eigenvalue_weights_each_batch_by_its_sample_count():
    model, loss_fn, a, _, _ = quadratic_problem(seed=4)
    sizes, scales = [1, 5, 2], [4.0, 1.0, 0.5]
    batches = [batch(n, s) for n, s in zip(sizes, scales, strict=True)]
    top = hessian_top_eigenvalue(model, batches, loss_fn=loss_fn, iters=500, tol=1e-10)
    weight = sum(n * s for n, s in zip(sizes, scales, strict=True)) / sum(sizes)  # H = weight * A
    assert top.converged
    assert top.value == pytest.approx(weight * np.linalg.eigvalsh(a).max(), rel=1e-6)


def test_top_eigenvalue_is_the_largest_in_magnitude_with_its_sign():
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((DIM, DIM)))
    a = q @ np.diag([-5.0, 3.0, 1.0, 0.5, -0.2, 2.0]) @ q.T
    model, loss_fn, _, _, _ = quadratic_problem(seed=5, a=a)
    top = hessian_top_eigenvalue(model, [batch(2)], loss_fn=loss_fn, iters=500, tol=1e-10)
    assert top.converged
    assert top.value == pytest.approx(-5.0, rel=1e-6)


def test_power_iteration_stops_at_its_budget_and_says_so():
    model, loss_fn, a, _, _ = quadratic_problem(seed=6)
    top = hessian_top_eigenvalue(model, [batch(2)], loss_fn=loss_fn, iters=1, tol=1e-12)
    assert top.iterations == 1 and not top.converged
    eigenvalues = np.linalg.eigvalsh(a)  # a Rayleigh quotient of a unit vector lies between the extremes
    assert eigenvalues.min() <= top.value <= eigenvalues.max()


def test_the_random_start_depends_only_on_the_seed():
    model, loss_fn, _, _, _ = quadratic_problem(seed=7)
    runs = [hessian_top_eigenvalue(model, [batch(2)], loss_fn=loss_fn, iters=3, seed=s).value for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


# ----------------------------------------------------------------------------------------------------------------
# A small MLP in float64: Hessian-vector products against finite differences, the eigenvalue against a dense Hessian


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def mlp_data(sizes=(6,)):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for n in sizes]


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_hessian_vector_product_matches_central_differences_of_the_gradient(mode):
    model = small_mlp()
    (x, y), = mlp_data()
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}

    def gradient_at(h: float) -> list[torch.Tensor]:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p.add_(h * v[n])
        return torch.autograd.grad(F.cross_entropy(moved(x), y), list(moved.parameters()))

    h = 1e-5
    reference = [(gp - gm) / (2 * h) for gp, gm in zip(gradient_at(h), gradient_at(-h), strict=True)]
    hv = _hvp(model, params, v, x, y, F.cross_entropy, mode)
    for (name, _), ref in zip(model.named_parameters(), reference, strict=True):
        torch.testing.assert_close(hv[name], ref, rtol=1e-6, atol=1e-8)


def test_top_eigenvalue_of_an_mlp_matches_its_dense_hessian():
    model = small_mlp()
    batches = mlp_data(sizes=(5, 3))  # the mean over all 8 samples: each batch weighted by its size
    shapes = [p.shape for p in model.parameters()]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss_of_flat(flat: torch.Tensor) -> torch.Tensor:  # the MLP written out by hand
        w1, b1, w2, b2 = (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes, strict=True))
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    eigenvalues = np.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of_flat, flat).numpy())
    expected = eigenvalues[np.abs(eigenvalues).argmax()]
    top = hessian_top_eigenvalue(model, batches, iters=1000, tol=1e-12)
    assert top.converged
    assert top.value == pytest.approx(expected, rel=1e-6)


def test_a_loss_without_forward_mode_support_still_gets_its_eigenvalue():
    # F.mse_loss fails under jvp-over-grad in recent torch; the reverse-over-reverse product takes over.
    model = nn.Linear(3, 2).double()
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(7, 2, dtype=torch.float64)
    top = hessian_top_eigenvalue(model, [(x, y)], loss_fn=F.mse_loss, iters=500, tol=1e-12)
    xb = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1)  # [x, 1]: weight and bias of one output
    expected = np.linalg.eigvalsh((xb.T @ xb).numpy() * 2 / (7 * 2)).max()  # mean over 7 x 2 outputs
    assert top.converged
    assert top.value == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Eval mode and what is restored


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


def test_sam_increase_is_measured_in_eval_mode_with_running_statistics():
    torch.manual_seed(0)
    model = SmallCNN().double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # running statistics away from their initial values, so train and eval mode differ
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1)
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    batches = [(torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
               for n in (4, 3)]

    expected = []  # SAM's step by hand, on a copy in eval mode
    for x, y in batches:
        ref = copy.deepcopy(model).eval()
        loss = F.cross_entropy(ref(x), y)
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads, strict=True):
                p.add_(0.05 * g / norm)
            expected.append(float(F.cross_entropy(ref(x), y) - loss))

    result = sam_sharpness(model, batches, rho=0.05)
    assert result.per_batch == pytest.approx(expected, rel=1e-9)
    assert model.training and model.drop.training
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


@pytest.fixture
def vit_batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in (3, 2)]


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)


def mess_up_state(model: nn.Module) -> None:
    """Mixed training flags, frozen and trainable parameters, gradients that are None and not."""
    model.train()
    for name, module in model.named_modules():
        if name.endswith(("attn", "norm1")):
            module.eval()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[3].requires_grad_(False)
    gen = torch.Generator().manual_seed(6)
    for i, p in enumerate(params):
        if i % 3 == 0:
            p.grad = torch.randn(p.shape, generator=gen)


def snapshot(model: nn.Module) -> dict:
    named = dict(model.named_parameters())
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": named,
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in named.items()},
        "flags": {n: p.requires_grad for n, p in named.items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before["state"][k]), k
    for n, p in model.named_parameters():
        assert p is before["params"][n], n
        grad, values = before["grads"][n]
        assert p.grad is grad, n
        if values is not None:
            assert torch.equal(p.grad, values), n
        assert p.requires_grad is before["flags"][n], n
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]


def test_measure_sharpness_leaves_test_vit_exactly_as_it_was(vit_batches):
    model = make_vit()
    mess_up_state(model)
    assert any(m.training for m in model.modules()) and any(not m.training for m in model.modules())
    before = snapshot(model)
    result = measure_sharpness(model, vit_batches, iters=3)
    assert_unchanged(model, before)
    assert math.isfinite(result.sam_increase) and math.isfinite(result.top_eigenvalue)
    assert result.eigen_iterations <= 3


class RaisesOnSecondCall(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("forward failed on call 2")
        return self.inner(x)


@pytest.mark.parametrize("measure", [
    sam_sharpness,  # raises in the perturbed forward
    lambda model, batches: hessian_top_eigenvalue(model, batches, iters=3),  # in the second product
    measure_sharpness,
])
def test_a_forward_that_raises_leaves_the_model_as_it_was(measure, vit_batches):
    model = RaisesOnSecondCall(make_vit())
    mess_up_state(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="failed on call 2"):
        measure(model, vit_batches)
    assert model.calls == 2
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def test_measure_sharpness_runs_on_a_reweighted_test_vit(vit_batches):
    model = timm_remem.reweight(make_vit(), alpha=0.85)
    scales = timm_remem.get_scales(model)
    assert not any("remem_scale" in n for n, p in model.named_parameters() if p.requires_grad)
    result = measure_sharpness(model, vit_batches, rho=0.05, iters=3)
    assert isinstance(result, Sharpness)
    assert result.num_batches == 2 and result.num_samples == 5 and result.rho == 0.05
    assert len(result.sam_increase_per_batch) == 2
    assert result.sam_increase == pytest.approx(np.mean(result.sam_increase_per_batch))
    assert result.sam_increase > 0 and math.isfinite(result.top_eigenvalue)
    assert timm_remem.get_scales(model) == scales
    data = json.loads(json.dumps(result.to_dict()))
    assert data["sam_increase_per_batch"] == list(result.sam_increase_per_batch)
    assert list(data) == sorted(data)


def test_measure_sharpness_agrees_with_the_two_functions_and_skips_the_eigenvalue_when_asked():
    model, loss_fn, _, _, _ = quadratic_problem(seed=8)
    batches = [batch(2), batch(3, 2.0)]
    full = measure_sharpness(model, batches, loss_fn=loss_fn, rho=0.1, iters=20, seed=3)
    sam = sam_sharpness(model, batches, loss_fn=loss_fn, rho=0.1)
    top = hessian_top_eigenvalue(model, batches, loss_fn=loss_fn, iters=20, seed=3)
    assert (full.sam_increase, full.sam_increase_per_batch, full.loss) == (sam.increase, sam.per_batch, sam.loss)
    assert (full.top_eigenvalue, full.eigen_iterations, full.eigen_converged) == tuple(top)
    only_sam = measure_sharpness(model, batches, loss_fn=loss_fn, rho=0.1, eigen=False)
    assert only_sam.top_eigenvalue is only_sam.eigen_iterations is only_sam.eigen_converged is None
    assert only_sam.sam_increase == sam.increase


def test_an_iterator_or_a_dataloader_of_batches_works():
    model, loss_fn, _, _, _ = quadratic_problem(seed=9)
    batches = [batch(2), batch(2, 3.0)]
    reference = measure_sharpness(model, batches, loss_fn=loss_fn, iters=10)
    assert measure_sharpness(model, iter(batches), loss_fn=loss_fn, iters=10) == reference
    dataset = torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    assert measure_sharpness(model, loader, loss_fn=loss_fn, iters=10) == reference


def test_floating_inputs_are_cast_to_the_models_dtype():
    model = small_mlp()
    (x, y), = mlp_data()
    assert sam_sharpness(model, [(x.float(), y)]).increase == pytest.approx(sam_sharpness(model, [(x, y)]).increase)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs


def quadratic_call(**kwargs):
    model, loss_fn, _, _, _ = quadratic_problem()
    kwargs.setdefault("loss_fn", loss_fn)
    return measure_sharpness(model, kwargs.pop("batches", [batch(2)]), **kwargs)


@pytest.mark.parametrize("rho, shown", [(0, "0"), (-0.1, "-0.1"), (float("nan"), "nan"), (float("inf"), "inf"),
                                        (True, "True"), ("0.05", "'0.05'")])
def test_rho_must_be_a_positive_finite_number(rho, shown):
    with pytest.raises(ConfigError, match=rf"rho must be a finite number > 0, got {shown}; SAM's radius"):
        quadratic_call(rho=rho)
    with pytest.raises(ConfigError, match="rho must be"):
        sam_sharpness(Quadratic(torch.zeros(2)), [batch(2)], rho=rho)


@pytest.mark.parametrize("kwargs, message", [
    ({"iters": 0}, r"iters must be a positive integer, got 0; the number of power iterations"),
    ({"iters": 2.5}, r"iters must be a positive integer, got 2.5"),
    ({"tol": 0}, r"tol must be a finite number > 0, got 0; a relative tolerance"),
    ({"tol": -1e-3}, r"tol must be a finite number > 0, got -0.001"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
])
def test_power_iteration_settings_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        quadratic_call(**kwargs)
    with pytest.raises(ConfigError, match=message):
        hessian_top_eigenvalue(Quadratic(torch.zeros(2)), [batch(2)], **kwargs)


def test_eigen_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"eigen must be True or False, got 1; eigen=False skips"):
        quadratic_call(eigen=1)


@pytest.mark.parametrize("function", [sam_sharpness, hessian_top_eigenvalue, measure_sharpness])
def test_empty_batches_are_refused(function):
    with pytest.raises(ConfigError, match=r"batches yielded no batch; pass a non-empty iterable"):
        function(small_mlp(), [])
    with pytest.raises(ConfigError, match=r"batch 0 has no samples \(inputs of shape \(0, 4\)\); drop empty"):
        function(small_mlp(), [(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long))])


@pytest.mark.parametrize("function", [sam_sharpness, hessian_top_eigenvalue, measure_sharpness])
def test_a_model_without_trainable_parameters_is_refused(function):
    model = small_mlp().requires_grad_(False)
    with pytest.raises(ConfigError, match=r"Sequential has no trainable parameters \(none of its 4 parameters "
                                          r"requires grad\).*requires_grad_\(True\)"):
        function(model, mlp_data())


@pytest.mark.parametrize("batches, message", [
    (3, r"batches must be an iterable of \(inputs, labels\) pairs.*got int"),
    (torch.zeros(2, 4), r"batches must be an iterable of \(inputs, labels\) pairs.*got Tensor"),
    ([torch.zeros(2, 4)], r"batch 0 has no labels \(Tensor\).*\[\(x, y\)\] rather than one pair"),
])
def test_batches_must_be_input_label_pairs(batches, message):
    with pytest.raises(ConfigError, match=message):
        sam_sharpness(small_mlp(), batches)


def test_loss_fn_must_be_callable_and_return_a_scalar():
    with pytest.raises(ConfigError, match=r"loss_fn must be a callable loss_fn\(logits, labels\).*got str"):
        sam_sharpness(small_mlp(), mlp_data(), loss_fn="cross_entropy")
    per_sample = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(ConfigError, match=r"loss_fn must return a scalar tensor \(the batch mean\), got \(6,\) on "
                                          r"batch 0; use a loss with reduction='mean'"):
        sam_sharpness(small_mlp(), mlp_data(), loss_fn=per_sample)
    with pytest.raises(ConfigError, match=r"loss_fn must return a scalar tensor"):
        hessian_top_eigenvalue(small_mlp(), mlp_data(), loss_fn=per_sample)


def test_a_non_finite_loss_is_refused():
    model = small_mlp()
    (x, y), = mlp_data()
    with pytest.raises(ConfigError, match=r"the loss of batch 0 is nan; sharpness is undefined"):
        sam_sharpness(model, [(x * float("nan"), y)])


def test_batches_that_change_between_passes_are_refused():
    class Shrinking:
        def __init__(self) -> None:
            self.size = 6

        def __iter__(self):
            self.size -= 1
            return iter(mlp_data(sizes=(self.size,)))

    with pytest.raises(ConfigError, match=r"batches gave 5 samples on the first pass and 4 on pass 2"):
        hessian_top_eigenvalue(small_mlp(), Shrinking(), iters=3)
