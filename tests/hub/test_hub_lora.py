"""LoRA teachers on the Hub (issue 13 item 4): the merged plain timm checkpoint by default, the peft adapter alone
with ``adapter_only=True``; pushed to the loopback Hub server and loaded back by plain timm and by peft.

References: the adapted model's own forward (peft layers unmerged), plain timm's ``hf-hub:`` loader with strict
keys, and ``peft.PeftModel.from_pretrained`` onto a freshly built base with the same weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from huggingface_hub import snapshot_download

import timm_remem
from timm_remem.errors import ConfigError
from timm_remem.hub import save_pretrained

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning", "ignore::UserWarning")

BASE = "timm/test_vit.r160_in1k"
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _base(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)


def _lora(model):
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"]))
    with torch.no_grad():  # LoRA's B starts at zero: move it so that merging has something to fold
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return adapted.eval()


@torch.no_grad()
def _out(model):
    return model.eval()(X)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def lora_teacher():
    """A LoRA teacher on a reweighted base (reweight, then LoRA), and its outputs."""
    adapted = _lora(timm_remem.reweight(_base(), alpha=0.8))
    return adapted, _out(adapted)


def test_merged_push_loads_in_plain_timm_with_the_adapted_outputs(hub, lora_teacher):
    from hub_server import ALICE_WRITE

    adapted, expected = lora_teacher
    before = copy.deepcopy(adapted.state_dict())
    timm_remem.push_to_hub(adapted, "alice/vit-lora", token=ALICE_WRITE, base_model=BASE)
    assert set(hub.files("alice/vit-lora")) >= {"model.safetensors", "config.json", "README.md"}
    plain = timm.create_model("hf-hub:alice/vit-lora", pretrained=True)  # strict load by timm
    assert type(plain).__name__ == "VisionTransformer" and not timm_remem.is_reweighted(plain)
    assert _rel(_out(plain), expected) < 1e-5
    assert all(torch.equal(before[k], v) for k, v in adapted.state_dict().items())  # the teacher is untouched
    assert json.loads(hub.files("alice/vit-lora")["config.json"])["remem"]["lora"] == "merged"


def test_adapter_push_holds_peft_files_and_loads_onto_a_fresh_base(hub):
    from hub_server import ALICE_WRITE

    adapted = _lora(_base())
    expected = _out(adapted)
    timm_remem.push_to_hub(adapted, "alice/vit-adapter", token=ALICE_WRITE, adapter_only=True, base_model=BASE)
    files = hub.files("alice/vit-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "model.safetensors" not in files and "remem.json" not in files
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    card = files["README.md"].decode()
    assert f"base_model: {BASE}" in card and "library_name: peft" in card
    assert f'timm.create_model("hf-hub:{BASE}", pretrained=True, num_classes=5)' in card
    # peft's own Hub look-up uses an HfApi made at import (the real endpoint): give it the downloaded snapshot.
    folder = snapshot_download("alice/vit-adapter")
    loaded = peft.PeftModel.from_pretrained(_base(), folder).eval()
    assert _rel(_out(loaded), expected) < 1e-5
    assert _rel(_out(_base()), expected) > 1e-2  # the adapter matters: the base alone differs


def test_injected_adapters_are_merged_too(tmp_path):
    """Adapters injected without a PeftModel (peft.inject_adapter_in_model, as timm_remem.lora does)."""
    model = timm_remem.reweight(_base(), alpha=0.8)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["qkv", "fc2"]), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    expected = _out(model)
    save_pretrained(model, tmp_path)
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert _rel(_out(plain), expected) < 1e-5
    with pytest.raises(ConfigError, match="injected without a PeftModel"):
        save_pretrained(model, tmp_path / "adapter", adapter_only=True, base_model=BASE)


def test_adapter_only_refuses_trained_parameters_outside_the_adapter(tmp_path):
    adapted = _lora(_base())
    adapted.base_model.model.head.weight.requires_grad_(True)  # the head trained fully, not in modules_to_save
    with pytest.raises(ConfigError, match=r"would leave out 1 trained parameters .*head\.weight.*modules_to_save"):
        save_pretrained(adapted, tmp_path, adapter_only=True, base_model=BASE)


def test_adapter_of_a_reweighted_teacher_records_its_factors(lora_teacher, tmp_path):
    adapted, _ = lora_teacher
    save_pretrained(adapted, tmp_path, adapter_only=True, base_model=BASE)
    remem = json.loads((tmp_path / "remem.json").read_text())["remem"]
    assert remem["factors"] == pytest.approx([0.8 ** (i + 1) for i in range(6)]) and remem["lora"] == "adapter"
    assert "timm_remem.reweight(base, schedule=[0.8, 0.64," in (tmp_path / "README.md").read_text()


def test_adapter_only_needs_a_pretrained_base(lora_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"adapter_only=True needs base_model=\.\.\.: a LoRA adapter only "):
        save_pretrained(lora_teacher[0], tmp_path, adapter_only=True)
    assert not any(tmp_path.iterdir())


def test_adapter_only_needs_an_adapter(tmp_path):
    with pytest.raises(ConfigError, match="adapter_only=True needs a peft.PeftModel .* without adapters"):
        save_pretrained(_base(), tmp_path, adapter_only=True, base_model=BASE)


def test_a_folder_holds_one_export_whatever_was_saved_there_before(lora_teacher, tmp_path):
    # A merged save over an adapter folder, and the reverse: the other kind's files go (load_teacher would prefer a
    # stale config.json, peft would load stale adapter files), as does remem.json once the teacher has no factors.
    adapted, expected = lora_teacher
    folder = tmp_path / "teacher"
    save_pretrained(adapted, folder, adapter_only=True, base_model=BASE)
    assert {"adapter_config.json", "remem.json"} <= {p.name for p in folder.iterdir()}
    save_pretrained(adapted, folder)  # merged
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "model.safetensors", "README.md"}
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert _rel(_out(plain), expected) < 1e-5
    save_pretrained(_lora(_base()), folder, adapter_only=True, base_model=BASE)  # no factors this time
    names = {p.name for p in folder.iterdir()}
    assert "config.json" not in names and "model.safetensors" not in names and "remem.json" not in names
    assert "adapter_config.json" in names
    save_pretrained(_lora(_base()), folder, adapter_only=True, base_model=BASE)  # still ours: its card says so
