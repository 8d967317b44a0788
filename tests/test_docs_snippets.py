"""Every ```python snippet of README.md and docs/*.md runs, so a snippet cannot rot.

The blocks of one file run in order in one namespace (a later block may use names an earlier one defined), in a
fresh working directory, offline. Stand-ins, the only differences from what a user runs:

- ``timm.create_model(..., pretrained=True)`` builds the same architecture with random weights, and the large
  architectures the docs name (``vit_base_patch16_224``, ``vit_large_patch16_224``, ...) are shrunk to two narrow
  blocks at 32 px, so the snippets run in seconds (``_SHRINK``).
- The Hub is the loopback Hub-compatible server of ``tests/hub_server.py``, with a user ``me`` whose write token is
  in ``HF_TOKEN``: ``push_to_hub(teacher, "me/...")`` and ``hf-hub:me/...`` really go through the client.
- Training calls (``finetune_teacher``, ``distill_student``, ``select_teacher``) run at most 2 epochs of 2 batches
  (``limit_train_batches=2``; exports asked for at later epochs are written at the last one) with no progress
  bars; everything else is as written.
- A block that needs context the prose gives (a model, data, an optimizer) gets it from ``_CONTEXT``, keyed by the
  block's first line; a block that cannot run on a CPU-only machine is listed in ``_NEEDS`` with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from hub_server import serving

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

_SHRINK = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}
_BIG = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "vit_small_patch16_224")

# Context a block needs, keyed by its first line (what the surrounding prose says exists).
_SAM_CONTEXT = """
import timm, torch, timm_remem
model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
criterion = torch.nn.CrossEntropyLoss()
x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
opt = timm_remem.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
"""
_CONTEXT = {
    "def closure():": _SAM_CONTEXT,
    'scaler = torch.amp.GradScaler("cuda")': _SAM_CONTEXT,
    "out = task(x, y)": _SAM_CONTEXT + """
from timm_remem.distill import DistillationLoss, RememDistillationTask
teacher = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
task = RememDistillationTask(model, teacher, DistillationLoss("kd", temperature=4.0))
optimizer = opt
""",
    "import timm, timm_remem": """
import timm
teacher = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
""",
}
# Blocks that cannot run here, by first line, with the reason (kept short and honest).
_NEEDS = {
    "import torch, timm, torch.nn.functional as F": "FSDP2 on CUDA under torchrun (docs/distributed.md)",
    'base = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True, num_classes=100)':
        "peft's PeftModel.from_pretrained fetches the adapter from huggingface.co itself (docs/hub.md)",
}


def _blocks(path: Path) -> list[str]:
    return [m.group(1) for m in _FENCE.finditer(path.read_text(encoding="utf-8"))]


def _first_line(block: str) -> str:
    """A block's first line without its trailing comment (the key of _CONTEXT and _NEEDS)."""
    return block.strip().splitlines()[0].split("  #")[0].strip()


def _cases() -> list:
    cases = []
    for path in FILES:
        blocks = _blocks(path)
        if blocks:
            cases.append(pytest.param(path, blocks, id=path.name))
    return cases


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """The documented stand-ins: small random models, the loopback Hub, short training runs."""
    real_create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        base = name.split(".")[0]
        if base in _BIG:
            kwargs = {**_SHRINK, **{k: v for k, v in kwargs.items() if k not in _SHRINK}}
        return real_create(name, pretrained=False if not name.startswith(("hf-hub:", "local-dir:")) else pretrained,
                           **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    import timm_remem.train as train

    for fn_name in ("finetune_teacher", "distill_student", "select_teacher"):
        real = getattr(train, fn_name)

        def short(*args, _real=real, **kwargs):
            kwargs.setdefault("limit_train_batches", 2)
            kwargs.setdefault("progress", False)
            if kwargs.get("epochs", 0) > 2:  # at most 2 epochs; exports asked for later epochs move to the last
                kwargs["epochs"] = 2
                if kwargs.get("save_at"):
                    kwargs["save_at"] = sorted({min(e, 2) for e in kwargs["save_at"]})
            return _real(*args, **kwargs)

        monkeypatch.setattr(train, fn_name, short)
    monkeypatch.chdir(tmp_path)
    with serving(tmp_path / "hf_home", monkeypatch) as server:
        server.add_user("me")
        server.add_token("hf_me_write_token", "me", "write")
        monkeypatch.setenv("HF_TOKEN", "hf_me_write_token")
        yield server


def test_every_doc_with_python_has_snippets_collected():
    """The fence pattern finds the blocks (a broken pattern would make the test below vacuous)."""
    assert sum(len(_blocks(p)) for p in FILES) >= 15
    assert len(_blocks(ROOT / "README.md")) >= 3


@pytest.mark.parametrize(("path", "blocks"), _cases())
def test_snippets_run(path, blocks, stand_ins):
    namespace: dict = {"__name__": f"snippets_{path.stem}"}
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        first = _first_line(block)
        if first in _NEEDS:
            continue
        if first in _CONTEXT:
            exec(compile(_CONTEXT[first], f"<context of {path.name} block {i}>", "exec"), namespace)
        try:
            exec(compile(block, f"{path.name} block {i}", "exec"), namespace)
        except Exception as err:  # name the block: the traceback points into the compiled snippet
            raise AssertionError(f"{path.name} python block {i} (starting {first!r}) failed: {err!r}") from err


def test_skipped_blocks_still_exist():
    """A block listed in _NEEDS or _CONTEXT that no longer exists would hide a renamed snippet."""
    firsts = {_first_line(b) for p in FILES for b in _blocks(p)}
    assert set(_NEEDS) <= firsts
    assert set(_CONTEXT) <= firsts
