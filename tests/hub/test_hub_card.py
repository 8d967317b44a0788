"""Tests for timm_remem.hub.card: the README.md of a teacher folder, read back with huggingface_hub's ModelCard."""

from __future__ import annotations

import importlib.resources

import pytest
import timm
from hub_teachers import FACTORS, META
from huggingface_hub import ModelCard

from timm_remem.hub import save_pretrained


def _card(tmp_path) -> ModelCard:
    return ModelCard.load(tmp_path / "README.md")


def test_model_card_metadata_and_text(teacher, tmp_path):
    model, _ = teacher
    save_pretrained(model, tmp_path, repo_id="alice/vit-remem", **META)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "timm"
    assert set(card.data.tags) >= {"remem", "knowledge-distillation", "image-classification", "timm"}
    assert (card.data.base_model, card.data.datasets, card.data.license) == (
        "timm/test_vit.r160_in1k", ["cifar100"], "apache-2.0")
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["Top-1 accuracy (%)"] == 91.25
    assert any("resnet18" in name and value == 78.5 for name, value in values.items())
    assert 'timm.create_model("hf-hub:alice/vit-remem", pretrained=True)' in card.text
    assert "arXiv:2506.23041" in card.text and "| SAM radius rho | 0.1 |" in card.text


def test_card_tables_show_settings_factors_and_accuracies(teacher, tmp_path):
    save_pretrained(teacher[0], tmp_path, repo_id="alice/vit-remem", **META)
    lines = _card(tmp_path).text.splitlines()
    assert lines[0] == "# vit-remem"
    for row in ("| Fine-tuning dataset | `cifar100` |", "| Adaptive SAM | yes |", "| Epochs | 3 |",
                "| MLP weight alpha | 0.8 |", "| Schedule | `exponential` |", "| Reweighted blocks | all |",
                "| Learnable factors | yes |", "| Factors folded into the weights | yes |",
                "| this teacher | 91.25 |", "| `resnet18` student distilled from it | 78.5 |"):
        assert row in lines, row
    factor_rows = [line for line in lines if line.startswith("| ") and "`blocks." in line]
    assert factor_rows == [f"| {i} | `blocks.{i}.mlp` | {f} |" for i, f in enumerate(FACTORS)]


def test_unmerged_card_says_to_load_with_timm_remem(teacher, tmp_path):
    save_pretrained(teacher[0], tmp_path, merge=False, repo_id="alice/vit-remem")
    text = _card(tmp_path).text
    assert 'teacher = timm_remem.load_teacher("hf-hub:alice/vit-remem")' in text
    assert 'timm_remem.load_teacher("hf-hub:alice/vit-remem", merge=True)' in text
    assert "timm.create_model(" not in text and "| Factors folded into the weights | no |" in text


def test_card_of_a_plain_model_without_metadata_claims_nothing(tmp_path):
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    save_pretrained(model, tmp_path)
    card = _card(tmp_path)
    assert (card.data.base_model, card.data.datasets, card.data.license, card.data.eval_results) == (
        None, None, None, None)
    text = card.text
    assert text.startswith("# test_vit-remem\n\nA ReMem teacher: timm `test_vit` (1000 classes), trained from "
                           "random initialisation (no pretrained weights were loaded), prepared for ")
    assert "fine-tuned from" not in text and "## Evaluation" not in text and "Factor of each" not in text
    assert 'timm.create_model("hf-hub:<namespace>/<name>", pretrained=True)' in text
    assert "| MLP reweighting | no |" in text and "| SAM radius rho | not recorded |" in text
    assert "| MLP weight alpha |" not in text


def test_card_file_is_yaml_then_markdown_ending_with_one_newline(teacher, tmp_path):
    save_pretrained(teacher[0], tmp_path, **META)
    raw = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert raw.startswith("---\nbase_model: timm/test_vit.r160_in1k\n")
    assert raw.endswith("}\n```\n") and not raw.endswith("\n\n")
    assert "{{" not in raw and "{%" not in raw  # no template syntax left over
    assert "\n\n\n" not in raw


@pytest.mark.parametrize("dataset", ["{{ name }}", "{% if x %}"])
def test_metadata_that_looks_like_a_template_is_shown_as_written(teacher, tmp_path, dataset):
    save_pretrained(teacher[0], tmp_path, dataset=dataset)
    assert f"| Fine-tuning dataset | `{dataset}` |" in _card(tmp_path).text


def test_card_template_ships_with_the_package():
    template = importlib.resources.files("timm_remem.hub").joinpath("card_template.md")
    assert template.is_file() and "{{ card_data }}" in template.read_text(encoding="utf-8")
