"""SAM under DistributedDataParallel: two gloo processes on CPU.

Each rank trains a DDP-wrapped MLP (with BatchNorm and dropout) on its own data and, side by side, a plain copy with
a reference SAM written here: per-replica perturbation from the rank's own gradient (or from the averaged gradient
with ``sync_perturbation=True``), then the averaged gradient at ``w + e``. The one-pass SAM (given the parameters
only, as timm's factory does: it finds the DDP wrapper by itself) is checked against a reference Momentum-SAM: the
averaged gradient at ``w - rho v / ||v||`` with ``v`` the (identical) momentum buffers.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from timm_remem.sam import SAM, OnePassSAM

STEPS = 3
RHO = 0.2
CONFIGS = [("closure", False), ("two_step", False), ("closure", True)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def _average_grads(params: list[torch.Tensor], world: int) -> None:
    for p in params:
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _reference_step(model, opt, x, y, seed, world, sync):
    params = list(model.parameters())
    opt.zero_grad()
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    if sync:
        _average_grads(params, world)
    with torch.no_grad():
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
        saved = [p.clone() for p in params]
        for p in params:
            p.add_(RHO * p.grad / (norm + 1e-12))
    opt.zero_grad()
    torch.manual_seed(seed)  # same dropout masks in the perturbed pass
    F.cross_entropy(model(x), y).backward()
    _average_grads(params, world)
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    opt.step()
    return float(norm)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for usage, sync in CONFIGS:
        ddp = DistributedDataParallel(_model())
        ref = _model()
        opt = SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, sync_perturbation=sync)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        norms, ref_norms = [], []
        for step in range(STEPS):
            x, y = _data(rank, step)
            seed = 1000 * rank + step
            torch.manual_seed(seed)
            if usage == "closure":

                def closure(x=x, y=y, ddp=ddp):
                    loss = F.cross_entropy(ddp(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                with opt.first_pass(ddp):
                    F.cross_entropy(ddp(x), y).backward()
                if opt.first_step(zero_grad=True):
                    with opt.second_pass(ddp):
                        F.cross_entropy(ddp(x), y).backward()
                opt.second_step(zero_grad=True)
            norms.append(opt.stats.grad_norm)
            ref_norms.append(_reference_step(ref, ref_opt, x, y, seed, world, sync))
        results[(usage, sync)] = {
            "params": [p.detach().clone() for p in ddp.module.parameters()],
            "ref_params": [p.detach().clone() for p in ref.parameters()],
            "norms": norms,
            "ref_norms": ref_norms,
            "num_batches_tracked": int(ddp.module[1].num_batches_tracked),
        }
    results["onepass"] = _onepass_run(rank, world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _onepass_run(rank: int, world: int) -> dict:
    ddp = DistributedDataParallel(_model())
    ref = _model()
    opt = OnePassSAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_params = list(ref.parameters())
    perturbed = []
    for step in range(STEPS + 1):
        x, y = _data(rank, step)
        seed = 1000 * rank + step
        torch.manual_seed(seed)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        perturbed.append(opt.stats.perturbed)
        # reference: perturb by hand along -v / ||v||, average the gradient, restore, step
        saved = [p.detach().clone() for p in ref_params]
        bufs = [ref_opt.state[p].get("momentum_buffer") for p in ref_params]
        with torch.no_grad():
            if bufs[0] is not None:
                norm = torch.sqrt(sum((b**2).sum() for b in bufs))
                for p, b in zip(ref_params, bufs, strict=True):
                    p.sub_(RHO * b / (norm + 1e-12))
        ref_opt.zero_grad()
        torch.manual_seed(seed)
        F.cross_entropy(ref(x), y).backward()
        _average_grads(ref_params, world)
        with torch.no_grad():
            for p, w in zip(ref_params, saved, strict=True):
                p.copy_(w)
        ref_opt.step()
    return {"params": [p.detach().clone() for p in ddp.module.parameters()],
            "ref_params": [p.detach().clone() for p in ref_params], "perturbed": perturbed}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp / "rendezvous"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("config", CONFIGS, ids=["closure", "two_step", "closure_sync"])
def test_replicas_stay_identical(ddp_results, config):
    a, b = (r[config]["params"] for r in ddp_results)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b, strict=True))


@pytest.mark.distributed
@pytest.mark.parametrize("config", CONFIGS, ids=["closure", "two_step", "closure_sync"])
def test_ddp_update_matches_reference(ddp_results, config):
    for r in ddp_results:
        for p, q in zip(r[config]["params"], r[config]["ref_params"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert r[config]["norms"] == pytest.approx(r[config]["ref_norms"], rel=1e-10)


@pytest.mark.distributed
def test_first_pass_is_per_replica_by_default_and_synced_on_request(ddp_results):
    per_replica = [r[("closure", False)]["norms"] for r in ddp_results]
    synced = [r[("closure", True)]["norms"] for r in ddp_results]
    assert all(abs(u - v) > 1e-6 for u, v in zip(*per_replica, strict=True))  # each rank's own gradient
    assert synced[0] == pytest.approx(synced[1], rel=1e-12)  # one all-reduced gradient


@pytest.mark.distributed
def test_batchnorm_counts_one_update_per_step_under_ddp(ddp_results):
    assert all(r[c]["num_batches_tracked"] == STEPS for r in ddp_results for c in CONFIGS)


@pytest.mark.distributed
def test_one_pass_replicas_stay_identical_and_match_the_reference(ddp_results):
    a, b = (r["onepass"]["params"] for r in ddp_results)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b, strict=True))
    for r in ddp_results:
        assert r["onepass"]["perturbed"] == [False] + [True] * STEPS  # the first step has no direction yet
        for p, q in zip(r["onepass"]["params"], r["onepass"]["ref_params"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
