"""Training (timm_remem.train) under torchrun: 2 processes on CPU with gloo, on the loopback interface.

One ``python -m torch.distributed.run --nproc_per_node 2`` launch runs this file's ``__main__`` worker, which calls
the library on every rank (plain SGD, SAM, a run resumed mid-epoch, a distillation) and then the unchanged
``timm-remem finetune`` command line; each rank writes its final weights and history to files (test-only
code, the library has no hook for this). The tests compare those files with one another, with a single process
on the same global batch and with a per-replica SAM written here.
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
import torch

PER_RANK_BATCH = 16
WORLD = 2
# No dropout and no augmentation: single-process and DDP training then see the same numbers (up to rounding).
PLAIN = dict(model="test_vit", dataset="digits", img_size=16, batch_size=PER_RANK_BATCH, eval_batch_size=512,
             progress=False, epochs=2, limit_train_batches=3, optimizer="sgd", lr=0.05, momentum=0.9,
             weight_decay=1e-4, sched="cosine", seed=0, save_at=[2], keep_last=10)
SAM_RUN = dict(PLAIN, epochs=1, sched="none", weight_decay=0.0, rho=0.5, lr=0.1, save_at=[], save_state=False)
# Drop-path draws random masks on every rank: resuming is exact only if each rank gets its own RNG state back.
DROPOUT = dict(PLAIN, model_kwargs={"drop_path_rate": 0.25}, checkpoint_every=2, save_at=[])
# Another process holding an output folder's lock (flock + its details), written without timm_remem.
HOLDER = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}).encode())
print("held", flush=True)
sys.stdin.read()
"""


# ------------------------------------------------------------------------------------------------------------------
# The worker (runs on every rank under torchrun)
# ------------------------------------------------------------------------------------------------------------------


def _dump(out: Path, name: str, rank: int, result) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / f"{name}-rank{rank}.safetensors"))
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(result.history, sort_keys=True))


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from timm_remem.cli import main
    from timm_remem.train import distill_student, finetune_teacher

    rank = int(os.environ["RANK"])
    plain = finetune_teacher(**PLAIN, output=str(out / "plain"))  # joins the process group (gloo)
    _dump(out, "plain", rank, plain)
    _dump(out, "sam", rank, finetune_teacher(**SAM_RUN, output=str(out / "sam")))

    _dump(out, "dropout", rank, finetune_teacher(**DROPOUT, output=str(out / "dropout")))
    if rank == 0:  # a copy of the run as a kill after step 4 (mid-epoch 2) would have left it
        (out / "cut" / "train-state").mkdir(parents=True)
        shutil.copytree(out / "dropout" / "train-state" / "step-000000004",
                        out / "cut" / "train-state" / "step-000000004")
    dist.barrier()
    _dump(out, "resumed", rank, finetune_teacher(**DROPOUT, output=str(out / "cut"), resume=True))

    student = distill_student(model="test_resnet", dataset="digits", img_size=16, batch_size=PER_RANK_BATCH,
                              progress=False, epochs=1, limit_train_batches=3, save_at=[], rho=0.05,
                              teacher=str(plain.checkpoints[-1]), output=str(out / "student"))
    _dump(out, "student", rank, student)

    # A folder another process holds: rank 0 alone takes the lock, and every rank refuses (nobody waits forever).
    locked = out / "locked"
    holder = None
    if rank == 0:
        locked.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(locked / ".timm-remem.lock")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
    dist.barrier()
    try:
        finetune_teacher(**SAM_RUN, output=str(locked))
        refused = "not refused"
    except Exception as e:  # noqa: BLE001 - recorded for the test
        refused = f"{type(e).__name__}: {e}"
    (out / f"locked-rank{rank}.txt").write_text(refused)
    dist.barrier()
    if holder is not None:
        holder.stdin.close()
        holder.wait(timeout=30)

    # The command line, unchanged; it destroys the process group at the end.
    code = main(["finetune", "--model", "test_vit", "--img-size", "16", "--epochs", "1", "--batch-size", "16",
                 "--limit-train-batches", "2", "--rho", "0.05", "--opt", "sgd", "--no-progress",
                 "--output", str(out / "cli")])
    (out / f"cli-rank{rank}.exit").write_text(str(code))


# ------------------------------------------------------------------------------------------------------------------
# The tests (in the pytest process)
# ------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    return env


def _torchrun() -> list[str]:
    """torchrun on the loopback interface: MASTER_ADDR=127.0.0.1 and a free MASTER_PORT for the workers."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([*_torchrun(), __file__, str(out)], env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out, proc


def _weights(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"{name}-rank{rank}.safetensors"))


def _history(out: Path, name: str, rank: int) -> list[dict]:
    return json.loads((out / f"{name}-rank{rank}.json").read_text())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["plain", "sam", "dropout", "resumed", "student"])
def test_every_rank_ends_with_the_same_weights(ddp, name):
    out, _ = ddp
    a, b = _weights(out, name, 0), _weights(out, name, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_ranks_log_the_same_reduced_metrics(ddp):
    out, _ = ddp
    for name in ("plain", "student"):
        assert _history(out, name, 0) == _history(out, name, 1)
    record = _history(out, "student", 0)[-1]
    assert record["world_size"] == WORLD
    assert record["teacher_forwards"] == WORLD * 3  # summed over ranks: one teacher pass per step on each rank


@pytest.mark.distributed
def test_ddp_matches_single_process_on_the_same_global_batch(ddp, tmp_path):
    """Plain SGD: DDP's average of the 2 per-rank mean gradients is the mean over the global batch of 32."""
    from timm_remem.train import finetune_teacher

    out, _ = ddp
    single = finetune_teacher(**dict(PLAIN, batch_size=WORLD * PER_RANK_BATCH), output=str(tmp_path))
    ours = {k: v for k, v in single.model.state_dict().items()}
    ddp_weights = _weights(out, "plain", 0)
    initial_gap = _max_diff(ddp_weights, _initial_weights())
    assert initial_gap > 1e-3  # training moved the weights: agreement below is not trivial
    assert _max_diff(ddp_weights, ours) < 1e-5  # measured 3e-8: summation order only
    h_ddp, h_one = _history(out, "plain", 0), single.history
    assert [r["val_acc"] for r in h_ddp] == [r["val_acc"] for r in h_one]  # the full validation set, reduced
    for r_ddp, r_one in zip(h_ddp, h_one, strict=True):
        assert r_ddp["train_loss"] == pytest.approx(r_one["train_loss"], rel=1e-5)
        assert r_ddp["train_acc"] == r_one["train_acc"]


def _initial_weights() -> dict[str, torch.Tensor]:
    import timm
    from timm.utils import random_seed

    random_seed(0, 0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16).state_dict()


def _sam_reference(replicas: int) -> dict[str, torch.Tensor]:
    """SAM written out: each replica perturbs by its own half-batch gradient, the perturbed gradients are averaged.

    ``replicas=1`` is SAM on the whole global batch (one shared perturbation). Base optimizer: SGD with Nesterov
    momentum (timm's "sgd"); data order: the epoch permutation ``randperm(n, seed * 100003 + epoch)``, rank ``r``
    taking every ``WORLD``-th sample of each global batch.
    """
    import timm
    import torch.nn.functional as F
    from timm.data import resolve_model_data_config
    from timm.utils import random_seed

    from timm_remem.data import create_dataset

    random_seed(0, 0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16)
    dc = resolve_model_data_config(model)
    data = create_dataset("digits", None, "train", img_size=16, mean=dc["mean"], std=dc["std"])
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0 * 100003 + 0)).tolist()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=SAM_RUN["lr"], momentum=0.9, nesterov=True)
    global_batch = WORLD * PER_RANK_BATCH
    for k in range(SAM_RUN["limit_train_batches"]):
        ids = order[k * global_batch:(k + 1) * global_batch]
        parts = [ids[r::replicas] for r in range(replicas)]
        total = [torch.zeros_like(p) for p in params]
        for part in parts:
            x = torch.stack([data[i][0] for i in part])
            y = torch.tensor([data[i][1] for i in part])
            g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g)).item()
            with torch.no_grad():
                saved = [p.clone() for p in params]
                for p, gi in zip(params, g, strict=True):
                    p.add_(gi * (SAM_RUN["rho"] / (norm + 1e-12)))
            h = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            for t, hi in zip(total, h, strict=True):
                t.add_(hi / replicas)
        for p, t in zip(params, total, strict=True):
            p.grad = t
        opt.step()
    return model.state_dict()


@pytest.mark.distributed
def test_sam_perturbs_each_replica_by_its_own_gradient(ddp):
    """Per-replica SAM (the default) matches the reference and differs, by design, from SAM on the global batch."""
    out, _ = ddp
    ddp_weights = _weights(out, "sam", 0)
    per_replica = _max_diff(ddp_weights, _sam_reference(WORLD))
    global_batch = _max_diff(ddp_weights, _sam_reference(1))
    assert per_replica < 1e-5  # measured 9e-8
    assert global_batch > 1e-3  # measured 0.08


@pytest.mark.distributed
def test_resume_mid_epoch_matches_the_uninterrupted_run_on_every_rank(ddp):
    out, _ = ddp
    for rank in range(WORLD):
        a, b = _weights(out, "dropout", rank), _weights(out, "resumed", rank)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert _history(out, "resumed", 0) == [
        {**r, "epoch_time_s": s["epoch_time_s"], "samples_per_s": s["samples_per_s"]}
        for r, s in zip(_history(out, "dropout", 0), _history(out, "resumed", 0), strict=True)
    ]


@pytest.mark.distributed
def test_rank_zero_alone_writes_checkpoints_exports_and_metrics(ddp):
    from timm_remem.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint

    out, _ = ddp
    run = out / "plain"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # not one line per rank
    states = list_checkpoints(run / "train-state")
    assert [p.name for p in states] == ["step-000000003", "step-000000006"]
    for p in states:
        verify_checkpoint(p)
    assert load_checkpoint(states[-1], restore_rng=False).extra["world_size"] == WORLD
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-002"]
    assert [p.name for p in run.rglob(".*")] == [".timm-remem"]  # the run's marker; no temporary left behind


@pytest.mark.distributed
def test_a_folder_another_run_holds_is_refused_on_every_rank(ddp):
    out, _ = ddp
    messages = [(out / f"locked-rank{r}.txt").read_text() for r in range(WORLD)]
    assert all(m.startswith("TrainingError: output folder") and "is in use by another run: pid" in m
               for m in messages), messages
    assert messages[0] == messages[1]  # rank 0's decision, sent to the others
    assert sorted(p.name for p in (out / "locked").iterdir()) == [".timm-remem.lock"]  # the holder's; nothing else


@pytest.mark.distributed
def test_rank_zero_alone_takes_the_output_lock(ddp):
    out, proc = ddp
    for run in ("plain", "sam", "dropout", "cut", "student", "cli"):
        assert not (out / run / ".timm-remem.lock").exists(), run  # every run released it
    # one start-up line per run, from rank 0 alone: four library runs and the command line (the refused run: none)
    assert proc.stderr.count("finetune test_vit: ") == 5, proc.stderr[-3000:]


@pytest.mark.distributed
def test_command_line_runs_unchanged_under_torchrun(ddp):
    out, proc = ddp
    assert [(out / f"cli-rank{r}.exit").read_text() for r in range(WORLD)] == ["0", "0"]
    assert proc.stdout.count("teacher val acc") == 1  # rank 0 alone prints
    assert (out / "cli" / "checkpoints" / "epoch-001" / "model.safetensors").is_file()
    assert len((out / "cli" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.distributed
def test_distill_command_runs_under_torchrun(ddp, tmp_path):
    """The user's command line: ``torchrun --nproc_per_node 2 -m timm_remem distill ...``."""
    out, _ = ddp
    teacher = out / "plain" / "checkpoints" / "epoch-002"
    cmd = [*_torchrun(), "-m", "timm_remem", "distill", "--model", "test_resnet", "--teacher", str(teacher),
           "--img-size", "16", "--epochs", "1", "--batch-size", "16", "--limit-train-batches", "2", "--rho", "0.05",
           "--no-progress", "--output", str(tmp_path / "student")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("student val acc") == 1
    record = json.loads((tmp_path / "student" / "metrics.jsonl").read_text())
    assert record["world_size"] == WORLD and record["teacher_forwards"] == WORLD * 2
    assert (tmp_path / "student" / "checkpoints" / "epoch-001" / "model.safetensors").is_file()


@pytest.mark.distributed
def test_resume_with_another_number_of_processes_is_refused(ddp, tmp_path):
    from timm_remem.errors import CheckpointError
    from timm_remem.train import finetune_teacher

    out, _ = ddp
    shutil.copytree(out / "plain", tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"run of 2 process\(es\) but this run has 1.*--nproc_per_node 2"):
        finetune_teacher(**PLAIN, output=str(tmp_path / "run"), resume=True)


# ------------------------------------------------------------------------------------------------------------------
# Single-process checks of the torchrun plumbing
# ------------------------------------------------------------------------------------------------------------------


def _as_torchrun_rank(monkeypatch, local_rank: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    from timm_remem.train.builders import resolve_device as _device

    _as_torchrun_rank(monkeypatch, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only torch.device objects are built
    assert _device("auto") == torch.device("cuda", 3)
    assert _device("cuda") == torch.device("cuda", 3)
    assert _device("cpu") == torch.device("cpu")


def test_one_named_gpu_under_torchrun_is_refused(monkeypatch):
    from timm_remem.errors import ConfigError
    from timm_remem.train.builders import resolve_device as _device

    _as_torchrun_rank(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"device 'cuda:0' names one GPU.*pass --device cuda"):
        _device("cuda:0")


def test_torchrun_environment_without_master_address_is_a_clear_error(monkeypatch):
    from timm_remem.distributed import init_distributed
    from timm_remem.errors import ConfigError

    _as_torchrun_rank(monkeypatch, 0)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="WORLD_SIZE=4 but MASTER_ADDR is not set; launch with torchrun"):
        init_distributed("cpu")


def test_rank_outside_the_world_is_a_clear_error(monkeypatch):
    from timm_remem.distributed import init_distributed
    from timm_remem.errors import ConfigError

    _as_torchrun_rank(monkeypatch, 0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match=r"RANK='4' must be in \[0, WORLD_SIZE=4\)"):
        init_distributed("cpu")


def test_demo_under_torchrun_is_refused(monkeypatch, tmp_path):
    from timm_remem.errors import ConfigError
    from timm_remem.train import run_demo

    _as_torchrun_rank(monkeypatch, 0)
    with pytest.raises(ConfigError, match="the demo runs in one process"):
        run_demo(tmp_path, quick=True, progress=False)
    assert not any(tmp_path.iterdir())


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_run_on_main_in_one_process_returns_or_raises_as_the_call_does():
    from timm_remem import distributed
    from timm_remem.errors import TrainingError

    assert distributed.run_on_main(lambda: {"path": "runs/x"}) == {"path": "runs/x"}

    def busy():
        raise TrainingError("output folder 'x' is in use")

    with pytest.raises(TrainingError, match="is in use"):
        distributed.run_on_main(busy)
