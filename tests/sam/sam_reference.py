"""The independent reference for the SAM tests: tiny models, data, and the textbook SAM step.

The reference SAM step (``reference_sam_step``) is the textbook algorithm written with plain per-tensor torch ops:
gradient at w, global norm over all groups (with ``T = |w| + eta`` for adaptive groups), ``w + rho T^2 g / ||T g||``,
gradient there, exact restore, base step of an independent torch optimizer on a copy of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float64, size: int = 8) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def two_groups(model: nn.Module, rho_a: float = 0.05, rho_b: float = 0.3, **extra) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": params[:2], "rho": rho_a, **extra},
        {"params": params[2:], "rho": rho_b, "weight_decay": 0.0, **extra},
    ]


def reference_sam_step(model, base, groups, x, y, *, max_grad_norm=None):
    """Textbook SAM / ASAM step with per-tensor ops. ``groups``: dicts with params, rho, adaptive, eta."""
    params = [p for g in groups for p in g["params"]]
    base.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    with torch.no_grad():
        sq = 0.0
        for g in groups:
            for p in g["params"]:
                t = (p.abs() + g["eta"]) if g["adaptive"] else torch.ones_like(p)
                sq = sq + ((t * p.grad) ** 2).sum()
        norm = torch.sqrt(sq)
        saved = [p.clone() for p in params]
        for g in groups:
            for p in g["params"]:
                t2 = (p.abs() + g["eta"]) ** 2 if g["adaptive"] else torch.ones_like(p)
                p.add_(g["rho"] * t2 * p.grad / (norm + EPS))
    base.zero_grad()
    loss2 = loss_fn(model, x, y)
    loss2.backward()
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    base.step()
    return loss.item(), loss2.item(), norm.item()


def reference_perturbation(groups) -> list[torch.Tensor]:
    """``e`` for every parameter of ``groups`` (dicts with params, rho, adaptive, eta), in float64, from ``p.grad``.

    ``e = rho T^2 g / ||T g||`` with ``T = |w| + eta`` in adaptive groups and ``T = 1`` otherwise; one global norm.
    """
    with torch.no_grad():
        ts, sq = [], torch.zeros((), dtype=torch.float64)
        for g in groups:
            for p in g["params"]:
                w, grad = p.detach().double(), p.grad.double()
                t = (w.abs() + g["eta"]) if g["adaptive"] else torch.ones_like(w)
                ts.append((g["rho"], t, grad))
                sq = sq + ((t * grad) ** 2).sum()
        norm = torch.sqrt(sq)
        return [rho * t * t * grad / (norm + EPS) for rho, t, grad in ts]


def ref_groups(model: nn.Module, rho_a=0.05, rho_b=0.3, adaptive=False, eta=0.01) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": params[:2], "rho": rho_a, "adaptive": adaptive, "eta": eta},
        {"params": params[2:], "rho": rho_b, "adaptive": adaptive, "eta": eta},
    ]


def sam_two_step(model, opt, x, y, **second_kwargs):
    loss_fn(model, x, y).backward()
    if opt.first_step(zero_grad=True):
        with opt.second_pass(model):
            loss_fn(model, x, y).backward()
    opt.second_step(zero_grad=True, **second_kwargs)


def make_closure(model, x, y):
    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    return closure


def assert_params_close(a: nn.Module, b: nn.Module, rtol=1e-10, atol=1e-12) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_params_differ(a: nn.Module, b: nn.Module) -> None:
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
