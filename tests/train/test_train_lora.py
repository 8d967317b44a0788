"""finetune_teacher with LoRA (lora_rank): exports, frozen base weights, bit-exact resume, provenance, torchrun.

References: the initial weights rebuilt from the seed (``random_seed(0, 0)`` then ``timm.create_model``, as
tests/train/test_train_distributed.py does), a plain ``timm.create_model`` loading each export with ``strict=True``,
the trained (adapted, reweighted) model's own forward, and a run split by a copied checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.utils import random_seed

from timm_remem.lora import is_lora, trainable_parameters
from timm_remem.train import FinetuneConfig, finetune_teacher
from timm_remem.train.builders import adapt_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = dict(model="test_vit", dataset="digits", img_size=16, batch_size=32, eval_batch_size=512, progress=False,
            limit_train_batches=3, optimizer="sgd", lr=0.05, weight_decay=0.0, seed=0, alpha=0.8, learnable=True,
            rho=0.05, lora_rank=4, lora_alpha=8.0)


def _initial() -> dict[str, torch.Tensor]:
    random_seed(0, 0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16).state_dict()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return finetune_teacher(**LORA, epochs=1, save_at=[1], output=str(tmp_path_factory.mktemp("lora")))


def test_only_adapters_head_and_factors_train_and_the_base_stays_as_initialised(lora_run):
    model = lora_run.model
    assert is_lora(model) and lora_run.trainable_params == trainable_parameters(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("head.") or n.endswith("remem_scale") for n in trained)
    initial = _initial()
    state = model.state_dict()
    for key, value in initial.items():
        if key.startswith("head."):
            assert not torch.equal(state[key], value), key  # the head trained fully
            continue
        layer, _, leaf = key.rpartition(".")
        base = f"{layer}.base_layer.{leaf}"
        assert torch.equal(state[base if base in state else key], value), key  # frozen, bit for bit
    assert any(float(state[k].abs().max()) > 0 for k in state if ".lora_B." in k)  # the adapters moved


def test_export_is_a_plain_timm_checkpoint_with_the_adapted_teachers_outputs(lora_run):
    folder = lora_run.checkpoints[-1]
    plain = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16)
    plain.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = lora_run.model.eval()(x)
        assert _rel(reloaded(x), y) < 1e-5
        assert _rel(plain.eval()(x), y) < 1e-5
        initial = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16).eval()
        initial.load_state_dict(_initial())
        assert _rel(initial(x), y) > 1e-3  # training changed the outputs: the match above is not trivial


def test_export_of_a_random_init_run_names_no_base_model(lora_run):
    remem = json.loads((lora_run.checkpoints[-1] / "config.json").read_text())["remem"]
    assert remem["base_model"] is None
    assert (remem["dataset"], remem["rho"], remem["alpha"]) == ("digits", 0.05, 0.8)


def test_export_of_a_pretrained_run_names_the_weights_it_started_from(lora_run, tmp_path):
    base = f"local-dir:{lora_run.checkpoints[-1]}"
    run = finetune_teacher(**dict(LORA, model=base, pretrained=True, learnable=False), epochs=1,
                           output=str(tmp_path / "b"))
    remem = json.loads((run.checkpoints[-1] / "config.json").read_text())["remem"]
    assert remem["base_model"] == base


def test_resume_after_one_epoch_is_bit_exact(tmp_path):
    run = dict(LORA, lora_dropout=0.2, epochs=2, save_at=[2], keep_last=10)
    whole = finetune_teacher(**run, output=str(tmp_path / "whole"))
    steps = sorted((tmp_path / "whole" / "train-state").iterdir())
    first = steps[0]  # written after epoch 1 (3 steps)
    assert first.name == "step-000000003"
    (tmp_path / "cut" / "train-state").mkdir(parents=True)
    shutil.copytree(first, tmp_path / "cut" / "train-state" / first.name)
    resumed = finetune_teacher(**run, output=str(tmp_path / "cut"), resume=True)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and any(".lora_A." in k for k in a) and any("remem_scale" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(str(whole.checkpoints[-1] / "model.safetensors"))
    eb = load_file(str(resumed.checkpoints[-1] / "model.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_training_checkpoints_hold_adapters_factors_and_optimizer_state_of_trainable_parameters_only(lora_run):
    step = sorted((lora_run.output / "train-state").iterdir())[-1]
    weights = load_file(str(step / "model.safetensors"))
    assert any(".lora_A.default." in k for k in weights) and any(k.endswith("remem_scale") for k in weights)
    state = load_file(str(step / "state.safetensors"))
    slots = {k.split(".")[3] for k in state if k.startswith("state.optimizer.state.")}
    assert len(slots) == sum(1 for p in lora_run.model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo on CPU)
# ------------------------------------------------------------------------------------------------------------------

WORLD = 2
DDP_RUN = dict(LORA, batch_size=16, epochs=1, save_at=[1], lora_dropout=0.1)


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    result = finetune_teacher(**DDP_RUN, output=str(out / "run"))
    state = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"exports": [str(p) for p in result.checkpoints]}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_lora_run_ends_with_identical_weights_on_every_rank(tmp_path):
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(a[k].abs().max()) > 0 for k in a if ".lora_B." in k)  # trained, not still at B = 0
    folder = Path(json.loads((tmp_path / "rank0.json").read_text())["exports"][-1])
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    teacher = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16)
    adapt_teacher(FinetuneConfig(**DDP_RUN), teacher).load_state_dict(a, strict=True)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(plain(x), teacher.eval()(x)) < 1e-5


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
