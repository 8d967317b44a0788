"""Provenance (issue 11 item 9): config.json and the card name a base model only when the caller says its weights
were loaded; ``base_model=None`` is "trained from random initialisation", whatever timm's pretrained_cfg says.

Reference: timm's own ``pretrained_cfg`` of a ``pretrained=False`` model names a Hub checkpoint
(``timm/test_vit.r160_in1k``) that was never loaded; none of its words may reach the folder.
"""

from __future__ import annotations

import json

import timm
from huggingface_hub import ModelCard

from timm_remem.hub import save_pretrained
from timm_remem.hub.metadata import RANDOM_INIT

BASE = "vit_base_patch16_224.augreg_in21k"


def _folder(tmp_path, **fields):
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    assert model.pretrained_cfg["hf_hub_id"] == "timm/test_vit.r160_in1k"  # timm fills it without loading weights
    save_pretrained(model, tmp_path, **fields)
    config = json.loads((tmp_path / "config.json").read_text())
    return config, ModelCard.load(tmp_path / "README.md")


def test_random_init_teacher_says_so_and_names_no_base(tmp_path):
    config, card = _folder(tmp_path, dataset="digits")
    remem, cfg = config["remem"], config["pretrained_cfg"]
    assert (remem["base_model"], remem["initialisation"]) == (None, "random")
    assert cfg["description"] == f"ReMem teacher {RANDOM_INIT} on digits, prepared for knowledge distillation with " \
                                 "timm-remem."
    assert card.data.base_model is None
    assert RANDOM_INIT in card.text and f"| Base model | none: {RANDOM_INIT} |" in card.text
    everything = json.dumps(config) + str(card)
    assert "test_vit.r160_in1k" not in everything and "fine-tuned from" not in everything
    assert "r160_in1k" not in cfg["tag"]


def test_named_base_model_is_recorded_and_linked(tmp_path):
    config, card = _folder(tmp_path, base_model=BASE, dataset="digits")
    assert (config["remem"]["base_model"], config["remem"]["initialisation"]) == (BASE, "pretrained")
    assert config["pretrained_cfg"]["description"].startswith(f"ReMem teacher fine-tuned from {BASE} on digits")
    assert card.data.base_model == f"timm/{BASE}"  # the Hub repository timm downloads it from
    assert f"fine-tuned from [{BASE}](https://huggingface.co/timm/{BASE})" in card.text
    assert RANDOM_INIT not in str(card) and f"| Base model | `{BASE}` |" in card.text


def test_training_fields_come_only_from_the_caller(tmp_path):
    config, card = _folder(tmp_path)
    remem = config["remem"]
    assert [remem[k] for k in ("dataset", "rho", "alpha", "teacher_accuracy")] == [None, None, None, None]
    assert card.data.datasets is None and card.data.eval_results is None
    assert "imagenet" not in json.dumps(remem).lower() and "in1k" not in json.dumps(config)


def test_base_weight_locations_of_pretrained_cfg_are_dropped(tmp_path):
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    model.pretrained_cfg = {**model.pretrained_cfg, "url": "https://example.org/base.pth", "file": "/base.pth"}
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert not {"url", "file", "hf_hub_id", "source"} & set(cfg)
