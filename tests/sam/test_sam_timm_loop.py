"""timm's train.py loop, reproduced with timm's own pieces, driving a one-pass SAM name from timm's registry.

The loop below follows timm's ``train_one_epoch`` / ``validate`` / ``CheckpointSaver`` pattern (timm 1.0.31, HEAD
of pytorch-image-models): ``create_optimizer_v2(model, "samadamw")`` (parameter groups only reach the class),
AMP autocast with ``NativeScaler`` (backward, unscale, clip, ``scaler.step``, ``update`` on the last micro-batch),
gradient accumulation with ``loss / accum_steps``, ``optimizer.zero_grad()`` then ``ModelEmaV3.update`` after each
update, evaluation in eval mode after each epoch, then ``CheckpointSaver.save_checkpoint``. ``step()`` never sees a
closure and the loop never calls anything of ours.

The reference runs the same loop with timm's plain ``momentum`` (SGD) and the Momentum-SAM perturbation written by
hand (save ``w``, ``w -= rho v / ||v||`` before each micro-batch forward, ``w`` put back after its backward). SGD, not
AdamW, for the comparison: Adam divides by the gradient's scale, so on parameters whose gradient is rounding noise
(the attention key bias gets an exactly zero gradient in exact arithmetic) last-bit differences become lr-sized. The
checkpoints and EMA weights timm writes must match the reference's clean weights, far closer than the perturbation.
"""

from __future__ import annotations

import math

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler

import timm_remem  # noqa: F401  (registers the names)
from timm_remem.sam import OnePassSAM

RHO, LR, ACCUM, EPOCHS, BATCHES = 0.1, 0.05, 2, 2, 6


def _model():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)


def _loader():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(BATCHES)]


class HandPerturbation:
    """Momentum-SAM's perturbation done by the loop itself, on timm's plain ``momentum`` (SGD)."""

    def __init__(self, optimizer):
        self.opt, self.saved = optimizer, None

    def perturb(self):
        pairs = [(p, self.opt.state[p]["momentum_buffer"]) for g in self.opt.param_groups for p in g["params"]
                 if "momentum_buffer" in self.opt.state.get(p, {})]
        if not pairs:
            return
        norm = math.sqrt(sum(float(m.double().pow(2).sum()) for _, m in pairs))
        self.saved = [(p, p.detach().clone()) for p, _ in pairs]
        with torch.no_grad():
            for p, m in pairs:
                p.add_(m, alpha=-RHO / (norm + 1e-12))

    def restore(self):
        if self.saved:
            with torch.no_grad():
                for p, w in self.saved:
                    p.copy_(w)
        self.saved = None


def _validate(model, loader):
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return correct / sum(len(y) for _, y in loader)


def _timm_loop(tmp_path, opt_name, hand=False, plain=False):
    model, loader = _model(), _loader()
    optimizer = timm.optim.create_optimizer_v2(model, opt_name, lr=LR, weight_decay=0.05,
                                               **({} if hand or plain else {"rho": RHO}))
    hand_sam = HandPerturbation(optimizer) if hand else None
    loss_scaler = NativeScaler(device="cpu")
    ema = ModelEmaV3(model, decay=0.5)
    saver = CheckpointSaver(model, optimizer, model_ema=ema, amp_scaler=loss_scaler, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=EPOCHS + 1)
    seen_at_update, num_updates = [], 0
    for epoch in range(EPOCHS):
        model.train()
        optimizer.zero_grad()
        for batch_idx, (x, y) in enumerate(loader):
            need_update = (batch_idx + 1) % ACCUM == 0 or batch_idx == len(loader) - 1
            if hand:
                hand_sam.perturb()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y) / ACCUM
            if hand:  # NativeScaler's own sequence, with the restore between backward and step
                loss_scaler._scaler.scale(loss).backward()
                hand_sam.restore()
                if need_update:
                    loss_scaler._scaler.unscale_(optimizer)
                    timm.utils.dispatch_clip_grad(model.parameters(), 1.0)
                    loss_scaler._scaler.step(optimizer)
                    loss_scaler._scaler.update()
            else:
                loss_scaler(loss, optimizer, clip_grad=1.0, parameters=model.parameters(), need_update=need_update)
            if not need_update:
                continue
            num_updates += 1
            optimizer.zero_grad()
            ema.update(model, step=num_updates)
            seen_at_update.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        metric = _validate(model, loader)
        saver.save_checkpoint(epoch, metric=metric)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, optimizer, final, seen_at_update, ema


def _close(actual, expected, what):
    for k, e in expected.items():
        torch.testing.assert_close(actual[k], e, rtol=2e-4, atol=2e-6, msg=f"{what}: {k}")


def _checkpoint(tmp_path, epoch):
    return torch.load(tmp_path / f"checkpoint-{epoch}.pth.tar", map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_timm_loop_writes_the_unperturbed_model(tmp_path):
    ours_dir, ref_dir = tmp_path / "ours", tmp_path / "ref"
    ours_dir.mkdir(), ref_dir.mkdir()
    model, optimizer, final, seen, ema = _timm_loop(ours_dir, "sammomentum")
    _, _, ref_final, ref_seen, ref_ema = _timm_loop(ref_dir, "momentum", hand=True)
    assert isinstance(optimizer, OnePassSAM) and optimizer.stats.perturbed
    assert not optimizer.is_perturbed
    # Far closer than the perturbation (rho = 0.1 spread over ~0.1 M weights is ~3e-4 per element), so a perturbed
    # read anywhere would fail these.
    for mine, ref in zip(seen, ref_seen, strict=True):
        _close(mine, ref, "state_dict after an update")
    _close(final, ref_final, "final weights")
    _close(ema.module.state_dict(), ref_ema.module.state_dict(), "EMA")
    for epoch in range(EPOCHS):
        ckpt, ref_ckpt = _checkpoint(ours_dir, epoch), _checkpoint(ref_dir, epoch)
        _close(ckpt["state_dict"], ref_ckpt["state_dict"], f"checkpoint {epoch}")
        _close(ckpt["state_dict_ema"], ref_ckpt["state_dict_ema"], f"checkpoint {epoch} EMA")
    # and the perturbation did happen: a run without it ends elsewhere
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    _, _, plain_final, _, _ = _timm_loop(plain_dir, "momentum", plain=True)
    assert max(float((plain_final[k] - final[k]).abs().max()) for k in final) > 1e-3


@pytest.mark.parametrize("name", ["sam", "samsgd", "sammomentum", "samadam", "samadamw"])
def test_every_registered_name_survives_the_timm_loop(name, tmp_path):
    model, optimizer, final, _, _ = _timm_loop(tmp_path, name)
    assert isinstance(optimizer, OnePassSAM) and optimizer.stats.perturbed
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
