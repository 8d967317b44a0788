"""OnePassSAM (Momentum-SAM) against a hand-written float64 loop with explicit perturb / restore.

The reference below uses no torch.optim and no hooks: it keeps its own momentum (SGD) or moments (AdamW), takes the
gradient at ``w - rho v / ||v||`` with ``torch.func.functional_call`` and steps at ``w``. Every invariant test reads
the weights where something outside the training forward/backward would (an eval forward, ``state_dict()``, EMA,
a skipped AMP step, an exception) and compares them with the reference's clean weights.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.func import functional_call

import timm_remem  # noqa: F401  (registers the names)
from timm_remem.errors import ConfigError
from timm_remem.sam import OnePassSAM, OnePassSAMSGD, create_sam

RHO, LR = 0.2, 0.1


def _mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def _batch(step: int, dtype=torch.float64, n: int = 8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


class Reference:
    """Momentum-SAM written out: SGD (momentum, nesterov, or none) or AdamW, float64, explicit perturb/restore."""

    def __init__(self, model: nn.Module, kind: str = "sgd", momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, rho: float = RHO, lr: float = LR) -> None:
        self.model, self.kind, self.mu, self.nesterov = model, kind, momentum, nesterov
        self.wd, self.rho, self.lr = weight_decay, rho, lr
        self.w = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.v: dict[str, torch.Tensor] | None = None  # SGD buffer / Adam exp_avg / last gradient
        self.m2: dict[str, torch.Tensor] = {}
        self.t = 0
        self.seen: list[dict[str, torch.Tensor]] = []  # the weights each training forward ran at

    def grad_at(self, w, batches):
        w = {k: t.clone().requires_grad_(True) for k, t in w.items()}
        total = 0.0
        for x, y in batches:
            loss = F.cross_entropy(functional_call(self.model, w, (x,)), y) / len(batches)
            loss.backward()
            total += float(loss.detach())
        return {k: t.grad for k, t in w.items()}, total

    def perturbed(self):
        if self.v is None:
            return dict(self.w)
        norm = math.sqrt(sum(float((v * v).sum()) for v in self.v.values()))
        return {k: self.w[k] - self.rho * self.v[k] / (norm + 1e-12) for k in self.w}

    def step(self, batches):
        w_tilde = self.perturbed()
        self.seen.append(w_tilde)
        g, loss = self.grad_at(w_tilde, batches)
        self.t += 1
        if self.kind == "sgd":
            if self.mu == 0:
                self.w = {k: self.w[k] - self.lr * (g[k] + self.wd * self.w[k]) for k in self.w}
                self.v = g
                return loss
            d = {k: g[k] + self.wd * self.w[k] for k in self.w}
            self.v = d if self.v is None else {k: self.mu * self.v[k] + d[k] for k in self.w}
            upd = {k: d[k] + self.mu * self.v[k] for k in self.w} if self.nesterov else self.v
            self.w = {k: self.w[k] - self.lr * upd[k] for k in self.w}
        else:  # AdamW
            b1, b2, eps = 0.9, 0.999, 1e-8
            self.v = {k: (self.v[k] if self.v else 0) * b1 + (1 - b1) * g[k] for k in self.w}
            self.m2 = {k: self.m2.get(k, 0) * b2 + (1 - b2) * g[k] ** 2 for k in self.w}
            c1, c2 = 1 - b1**self.t, 1 - b2**self.t
            self.w = {k: self.w[k] * (1 - self.lr * self.wd) - self.lr * (self.v[k] / c1)
                      / ((self.m2[k] / c2).sqrt() + eps) for k in self.w}
        return loss


def _weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_weights(model_or_dict, expected, rtol=1e-10, atol=1e-12):
    actual = model_or_dict if isinstance(model_or_dict, dict) else _weights(model_or_dict)
    for k, e in expected.items():
        torch.testing.assert_close(actual[k], e, rtol=rtol, atol=atol, msg=k)


def _train_step(model, opt, batches):
    for x, y in batches:
        (F.cross_entropy(model(x), y) / len(batches)).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("opt_name, kind, nesterov", [("sammomentum", "sgd", False), ("samsgd", "sgd", True),
                                                      ("samadamw", "adamw", False)])
def test_trajectory_matches_reference_from_timm_factory(opt_name, kind, nesterov):
    # Built exactly as timm's train.py builds it: create_optimizer_v2(model, name) hands the class parameter groups
    # only; the optimizer finds the model through its first training forward.
    model = _mlp()
    wd = 0.05 if kind == "adamw" else 0.0
    lr = 0.01 if kind == "adamw" else LR
    opt = timm.optim.create_optimizer_v2(model, opt_name, lr=lr, weight_decay=wd, rho=RHO)
    assert isinstance(opt, OnePassSAM)
    # timm puts biases in a no-decay group: the reference decays every tensor, so use weight_decay on weights only
    ref = Reference(_mlp(), kind, nesterov=nesterov, weight_decay=0.0, lr=lr)
    if wd:
        for group in opt.param_groups:
            group["weight_decay"] = 0.0
    for step in range(5):
        batch = [_batch(step)]
        _train_step(model, opt, batch)
        ref.step(batch)
        _assert_weights(model, ref.w)
    assert opt.stats.perturbed and opt.stats.perturbation_norm == pytest.approx(RHO)


class _Checkpointed(nn.Module):
    """The MLP under activation checkpointing (timm's ``set_grad_checkpointing``): backward re-runs it."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.mlp, x, use_reentrant=False)


@pytest.mark.parametrize("wrap", ["compile", "compile_given_model", "checkpoint"])
def test_trajectory_matches_reference_under_compile_and_checkpointing(wrap):
    # timm's train.py compiles the model after building the optimizer (--torchcompile) and can checkpoint activations
    # (--grad-checkpointing): the hooks must run (eagerly, outside the compiled graph) and the recomputed forward must
    # see the same perturbed weights. aot_eager traces like inductor without needing a C++ compiler.
    model = _mlp()
    if wrap == "compile_given_model":
        opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=model)
    else:
        opt = timm.optim.create_optimizer_v2(model, "sammomentum", lr=LR, weight_decay=0.0, rho=RHO)
    run = _Checkpointed(model) if wrap == "checkpoint" else torch.compile(model, backend="aot_eager")
    ref = Reference(_mlp(), "sgd")
    for step in range(4):
        batch = [_batch(step)]
        _train_step(run, opt, batch)
        ref.step(batch)
        _assert_weights(model, ref.w)
        run.eval()
        with torch.no_grad():
            run(batch[0][0])  # an eval forward in between sees (and leaves) w
        run.train()
        _assert_weights(model, ref.w)
    assert opt.stats.perturbed


def test_sgd_without_momentum_uses_the_last_gradient():
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.0)
    ref = Reference(_mlp(), "sgd", momentum=0.0)
    for step in range(4):
        _train_step(model, opt, [_batch(step)])
        ref.step([_batch(step)])
        _assert_weights(model, ref.w)
    n_params = sum(p.numel() for p in model.parameters())
    assert opt.buffer_nbytes == 2 * n_params * 8  # saved w + the last gradient


def test_weights_seen_by_the_forward_are_perturbed_and_clean_everywhere_else():
    model = _mlp()
    opt = create_sam(model, "momentum", lr=LR, rho=RHO, weight_decay=0.0, one_pass=True)
    ref = Reference(_mlp(), "sgd")
    seen = []
    model[0].register_forward_pre_hook(
        lambda m, a: seen.append((m.training, torch.is_grad_enabled(), m.weight.detach().clone())))
    ema = ModelEmaV3(model, decay=0.0)  # decay 0: the EMA copies what it reads
    for step in range(4):
        batch = [_batch(step)]
        x, y = batch[0]
        out = model(x)
        train_seen = seen[-1][2]
        torch.testing.assert_close(train_seen, ref.perturbed()["0.weight"], rtol=1e-10, atol=1e-12)
        # state_dict between the forward and its backward: clean weights (and the backward is refused, not wrong)
        if step == 2:
            sd = model.state_dict()
            _assert_weights({k: sd[k] for k in ref.w}, ref.w)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                F.cross_entropy(out, y).backward()
            opt.zero_grad()
            out = model(x)  # the training forward again: perturbed again, by the same e
            torch.testing.assert_close(seen[-1][2], ref.perturbed()["0.weight"], rtol=1e-10, atol=1e-12)
        F.cross_entropy(out, y).backward()
        _assert_weights(model, ref.w)  # the backward put w back
        opt.step()
        ref.step(batch)
        _assert_weights(model, ref.w)
        ema.update(model)
        _assert_weights({k: v for k, v in ema.module.state_dict().items() if k in ref.w}, ref.w)
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        assert not seen[-1][0] and not opt.is_perturbed
        torch.testing.assert_close(seen[-1][2], ref.w["0.weight"], rtol=1e-10, atol=1e-12)


def test_gradient_accumulation_perturbs_once_per_step():
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    ref = Reference(_mlp(), "sgd")
    seen = []
    model[2].register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    for step in range(4):
        micro = [_batch(step * 10 + i, n=4) for i in range(3)]
        before = len(seen)
        for x, y in micro:
            (F.cross_entropy(model(x), y) / len(micro)).backward()
            _assert_weights(model, ref.w)  # between micro-batches: w
        ref.step(micro)
        per_micro = seen[before:]
        assert len(per_micro) == 3
        for s in per_micro:  # the same e for every micro-batch of the step
            torch.testing.assert_close(s, ref.seen[-1]["2.weight"], rtol=1e-10, atol=1e-12)
        opt.step()
        opt.zero_grad()
        _assert_weights(model, ref.w)


def test_exception_in_the_forward_leaves_w():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fail = _mlp(), False

        def forward(self, x):
            out = self.body(x)
            if self.fail:
                raise RuntimeError("boom")
            return out

    model = Flaky()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(2):
        _train_step(model, opt, [_batch(step)])
    clean = _weights(model)
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        model(_batch(5)[0])
    assert not opt.is_perturbed
    _assert_weights(model, clean, rtol=0, atol=0)


def test_skipped_amp_step_leaves_w_and_the_state():
    model = _mlp(torch.float32)
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(2):
        x, y = _batch(step, torch.float32)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    clean = _weights(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = _batch(9, torch.float32)
    out = model(x)
    assert opt.is_perturbed
    (scaler.scale(F.cross_entropy(out, y)) * float("inf")).backward()  # an overflow: GradScaler skips step()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    _assert_weights(model, clean, rtol=0, atol=0)
    for p, m in zip(model.parameters(), momentum, strict=True):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=0, atol=0)


def test_parameter_the_backward_does_not_reach_is_restored_by_zero_grad_and_step():
    model = _mlp()
    extra = nn.Linear(5, 3).double()  # trained in step 0 and 1, then unused
    opt = OnePassSAM(list(model.parameters()) + list(extra.parameters()), torch.optim.SGD, rho=RHO, lr=LR,
                     momentum=0.9, model=model)
    for step in range(2):
        x, y = _batch(step)
        (F.cross_entropy(model(x) + extra(x), y)).backward()
        opt.step()
        opt.zero_grad()
    clean = _weights(extra)
    x, y = _batch(3)
    F.cross_entropy(model(x), y).backward()  # extra is perturbed (it has momentum) but gets no gradient
    assert opt.is_perturbed
    opt.zero_grad()
    _assert_weights(extra, clean, rtol=0, atol=0)
    assert not opt.is_perturbed


def test_resume_is_bit_exact():
    def run(steps, model, opt):
        for step in steps:
            _train_step(model, opt, [_batch(step)])

    model = _mlp()
    opt = timm.optim.create_optimizer_v2(model, "samadamw", lr=0.01, rho=RHO)
    run(range(3), model, opt)
    model_sd, opt_sd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(range(3, 7), model, opt)

    resumed = _mlp()
    resumed.load_state_dict(model_sd)
    resumed_opt = timm.optim.create_optimizer_v2(resumed, "samadamw", lr=0.01, rho=RHO)
    resumed_opt.load_state_dict(opt_sd)
    run(range(3, 7), resumed, resumed_opt)
    _assert_weights(resumed, _weights(model), rtol=0, atol=0)


@pytest.mark.parametrize("copy_fn", [copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))],
                         ids=["deepcopy", "pickle"])
def test_a_copied_model_and_optimizer_continue_exactly(copy_fn):
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(2):
        _train_step(model, opt, [_batch(step)])
    model2, opt2 = copy_fn((model, opt))
    for step in range(2, 5):
        _train_step(model, opt, [_batch(step)])
        _train_step(model2, opt2, [_batch(step)])
    assert opt2.stats.perturbed
    _assert_weights(model2, _weights(model), rtol=0, atol=0)


def test_closure_path_without_modules_perturbs_around_the_closure():
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = OnePassSAM([w], torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(w.detach().clone())
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    v = opt.state[w]["momentum_buffer"].clone()
    clean = w.detach().clone()
    opt.step(closure)
    torch.testing.assert_close(seen[-1], clean - 0.5 * v / v.norm(), rtol=1e-12, atol=1e-12)


def test_no_gradient_step_changes_nothing_and_discovery_stays_scoped():
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    assert opt._attachment.discovering
    before = _weights(model)
    opt.step()
    _assert_weights(model, before, rtol=0, atol=0)
    _train_step(model, opt, [_batch(0)])
    _train_step(model, opt, [_batch(1)])
    assert not opt._attachment.discovering  # the process-wide hook is gone once the model is known
    hooks = dict(nn.modules.module._global_forward_pre_hooks)
    del opt
    import gc

    gc.collect()
    assert dict(nn.modules.module._global_forward_pre_hooks) == hooks
    # a model whose optimizer is gone trains like a plain model: its hooks do nothing
    model(_batch(2)[0]).sum().backward()


def test_discovery_hook_is_removed_when_the_optimizer_is_collected():
    import gc

    hooks = dict(nn.modules.module._global_forward_pre_hooks)
    opt = OnePassSAM(_mlp().parameters(), torch.optim.SGD, lr=LR)
    assert len(nn.modules.module._global_forward_pre_hooks) == len(hooks) + 1
    del opt
    gc.collect()
    assert dict(nn.modules.module._global_forward_pre_hooks) == hooks


def test_other_models_are_not_touched():
    model, other = _mlp(), _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(3):
        _train_step(model, opt, [_batch(step)])
    before = _weights(other)
    other(_batch(0)[0]).sum().backward()
    _assert_weights(other, before, rtol=0, atol=0)
    assert not opt.is_perturbed


def test_refuses_exact_sam_options_and_api():
    params = _mlp().parameters()
    with pytest.raises(ConfigError, match="adaptive.*exact, two-pass SAM"):
        OnePassSAM(params, torch.optim.SGD, lr=0.1, adaptive=True)
    opt = OnePassSAMSGD(_mlp().parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="first_step\\(\\)/second_step\\(\\) belong to the exact"):
        opt.first_step()
    with pytest.raises(ConfigError, match="rho must be a finite number >= 0"):
        OnePassSAMSGD(_mlp().parameters(), lr=0.1, rho=-1)
    with pytest.raises(ConfigError, match="model must be the torch.nn.Module"):
        OnePassSAMSGD(_mlp().parameters(), lr=0.1, model="model")


def test_create_sam_builds_exact_sam_on_timm_groups():
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4)
    opt = create_sam(model, "adamw", lr=1e-3, weight_decay=0.05, rho=0.1, adaptive=True, layer_decay=0.8)
    base = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    assert type(opt).__name__ == "SAM" and opt.param_groups is opt.base_optimizer.param_groups
    strip = [{k: v for k, v in g.items() if k not in ("params", "rho", "adaptive", "eta")} for g in opt.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    with pytest.raises(ConfigError, match="a SAM name"):
        create_sam(model, "samadamw")


# ---------------------------------------------------------------- loop patterns found by probing from outside


def test_no_grad_forward_inside_a_step_runs_at_w_and_the_step_stays_sharpness_aware():
    # FixMatch / consistency loops: pseudo-labels from a no_grad (and an eval) forward of the same model between the
    # training forward and its backward. They must see w; the training gradient must still be taken at w + e.
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=model)
    ref = Reference(_mlp(), "sgd")
    for step in range(4):
        batch = [_batch(step)]
        x, y = batch[0]
        out = model(x)
        model.eval()
        with torch.no_grad():
            pseudo = model(x)
        model.train()
        torch.testing.assert_close(pseudo, functional_call(ref.model, ref.w, (x,)), rtol=1e-10, atol=1e-12)
        F.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
        ref.step(batch)
        _assert_weights(model, ref.w)


@pytest.mark.parametrize("order", ["no_grad_first", "eval_after_backward"])
def test_autocast_cache_never_serves_the_other_weights(order):
    # autocast caches each parameter's low-precision copy by tensor within a region; the swaps must drop it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=2.0, lr=0.1, momentum=0.9, model=model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    w = _weights(model)
    v = {k: opt.state[p]["momentum_buffer"] for k, p in model.named_parameters()}
    norm = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
    w_e = {k: w[k] - 2.0 * v[k] / norm for k in w}

    def at(weights):  # a fresh autocast region: no cache
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return functional_call(model, weights, (x,)).float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        if order == "no_grad_first":
            with torch.no_grad():
                first = model(x).float()
            out = model(x).float()
            torch.testing.assert_close(first, at(w))
            torch.testing.assert_close(out.detach(), at(w_e))
            F.cross_entropy(out, y).backward()
        else:
            F.cross_entropy(model(x), y).backward()
            model.eval()
            with torch.no_grad():
                torch.testing.assert_close(model(x).float(), at(w))
    _assert_weights(model, w)


def test_load_state_dict_between_forward_and_backward_is_kept():
    # A rollback after a bad loss: the forward ran (weights at w + e), the backward is skipped, the model reloaded.
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=model)
    for step in range(2):
        _train_step(model, opt, [_batch(step)])
    good = copy.deepcopy(model.state_dict())
    _train_step(model, opt, [_batch(2)])
    model(_batch(3)[0])  # perturbed now
    assert opt.is_perturbed
    model.load_state_dict(good)
    opt.zero_grad()
    _assert_weights(model, good)
    opt.step()  # no gradients: nothing changes
    _assert_weights(model, good)


def _unfrozen_after_build():
    """An MLP whose first layer was frozen when its OnePassSAM was built and is trainable again now."""
    model = _mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=model)
    for p in model[0].parameters():
        p.requires_grad_(True)
    return model, opt


def test_parameters_unfrozen_after_the_optimizer_was_built_are_restored_in_backward():
    model, opt = _unfrozen_after_build()
    ref = Reference(_mlp(), "sgd")
    for step in range(4):
        batch = [_batch(step)]
        x, y = batch[0]
        F.cross_entropy(model(x), y).backward()
        _assert_weights(model, ref.w)  # w right after backward (what timm's AGC clipping reads), frozen or not
        opt.step()
        opt.zero_grad()
        ref.step(batch)
        _assert_weights(model, ref.w)


def test_a_second_backward_of_a_graph_built_after_the_restore_is_taken_at_w():
    # loss.backward(), then a penalty on the (restored) weights and its own backward: the penalty's gradient is at w.
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=model)
    ref = Reference(_mlp(), "sgd")
    for step in range(4):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        (1e-2 * sum((p * p).sum() for p in model.parameters())).backward()
        opt.step()
        opt.zero_grad()
        # reference: the loss gradient at w + e, the penalty's at w, summed, then the SGD step
        w_tilde = ref.perturbed()
        g, _ = ref.grad_at(w_tilde, [(x, y)])
        g = {k: g[k] + 2e-2 * ref.w[k] for k in g}
        ref.t += 1
        ref.v = g if ref.v is None else {k: 0.9 * ref.v[k] + g[k] for k in g}
        ref.w = {k: ref.w[k] - LR * ref.v[k] for k in ref.w}
        _assert_weights(model, ref.w)


def test_a_newer_optimizer_takes_over_and_a_stale_one_stands_aside():
    # Stage 2 of a run builds a new optimizer while the first is still referenced (a scheduler, a notebook cell).
    model = _mlp()
    old = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(3):
        _train_step(model, old, [_batch(step)])
    # a newer OnePassSAM over the same weights: only it perturbs, from its first step
    ref = Reference(copy.deepcopy(model), "sgd")
    new = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(3, 7):
        batch = [_batch(step)]
        _train_step(model, new, batch)
        ref.step(batch)
        _assert_weights(model, ref.w)
    # the newer one retired (detach, or dropped): the older one, driven again, perturbs again
    new.detach()
    _train_step(model, old, [_batch(20)])
    model(_batch(21)[0])
    assert old.is_perturbed
    old.restore()
    # a newer OnePassSAM built and dropped without a step (an LR finder, a look at the groups) takes nothing away
    model3 = _mlp()
    first = OnePassSAM(model3.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    ref3 = Reference(_mlp(), "sgd")
    for step in range(2):
        _train_step(model3, first, [_batch(step)])
        ref3.step([_batch(step)])
    OnePassSAM(model3.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)  # dropped at once
    for step in range(2, 5):
        _train_step(model3, first, [_batch(step)])
        ref3.step([_batch(step)])
        _assert_weights(model3, ref3.w)
    # a plain optimizer next to a live OnePassSAM: the SAM stops perturbing, and says so
    model2 = _mlp()
    sam = OnePassSAM(model2.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(3):
        _train_step(model2, sam, [_batch(step)])
    plain = torch.optim.SGD(model2.parameters(), lr=LR)
    with pytest.warns(UserWarning, match="updated by something other than this optimizer"):
        for step in range(3, 6):
            _train_step(model2, plain, [_batch(step)])
    assert not sam.is_perturbed
    model2(_batch(9)[0])
    assert not sam.is_perturbed  # still aside
    sam.detach()  # the documented way out: no hooks left
    assert not model2._forward_pre_hooks


def test_a_step_whose_forward_bypassed_the_model_warns():
    # The loop calls a method of the model (forward_features) instead of the model: not sharpness-aware; said once.
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=16)
    opt = timm.optim.create_optimizer_v2(model, "sammomentum", lr=0.01, rho=0.05)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2,))
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    with pytest.warns(UserWarning, match="no training forward .* of the model it watches"):
        F.cross_entropy(model.forward_head(model.forward_features(x)), y).backward()
        opt.step()


@pytest.mark.parametrize("name, keyword", [("samadamw", "adaptive"), ("sam", "every"), ("samadam", "eta")])
def test_exact_sam_keywords_through_timm_names_are_refused_with_the_fix(name, keyword):
    # What --opt-kwargs adaptive=True reaches: a ConfigError naming create_sam, not a TypeError from the signature.
    with pytest.raises(ConfigError, match="create_sam"):
        timm.optim.create_optimizer_v2(_mlp(), name, lr=0.1, **{keyword: 1})


def test_loop_side_writes_after_a_skipped_step_are_not_taken_for_another_optimizer():
    # A step GradScaler skips (opt.step() not called), then weight clipping: the loop still drives this optimizer
    # (zero_grad), so it keeps perturbing, with no warning, and follows the reference that clips the same way.
    import warnings as _warnings

    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=model)
    ref = Reference(_mlp(), "sgd")
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        for step in range(6):
            batch = [_batch(step)]
            x, y = batch[0]
            F.cross_entropy(model(x), y).backward()
            if step in (2, 3):  # skipped: no step; the reference skips too
                opt.zero_grad()
            else:
                opt.step()
                opt.zero_grad()
                ref.step(batch)
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-0.5, 0.5)
            ref.w = {k: v.clamp(-0.5, 0.5) for k, v in ref.w.items()}
            _assert_weights(model, ref.w)
    assert opt.stats.perturbed


def test_an_exception_in_a_no_grad_forward_inside_a_step_leaves_w():
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=model)
    for step in range(2):
        _train_step(model, opt, [_batch(step)])
    clean = _weights(model)
    x, _ = _batch(5)
    model(x)  # a training forward: w + e
    assert opt.is_perturbed
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(torch.randn(3, 7, dtype=torch.float64))  # wrong width: raises inside the forward
    assert not opt.is_perturbed
    _assert_weights(model, clean)


def test_a_copy_of_a_detached_optimizer_stays_detached():
    model = _mlp()
    opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(2):
        _train_step(model, opt, [_batch(step)])
    opt.detach()
    model2, opt2 = copy.deepcopy((model, opt))
    model2(_batch(3)[0])
    assert not opt2.is_perturbed and not opt.is_perturbed


def test_state_dict_of_a_module_frozen_when_hooked_and_unfrozen_later_reads_w():
    model, opt = _unfrozen_after_build()
    for step in range(2):
        _train_step(model, opt, [_batch(step)])
    clean = {k: v.clone() for k, v in model[0].state_dict().items()}
    model(_batch(3)[0])
    assert opt.is_perturbed
    for k, v in model[0].state_dict().items():
        torch.testing.assert_close(v, clean[k], rtol=0, atol=0)
