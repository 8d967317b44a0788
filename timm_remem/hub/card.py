"""The model card (``README.md``) of a teacher folder: YAML metadata for the Hub plus a page for people, rendered
from the Jinja template ``card_template.md`` next to this file by huggingface_hub's ``ModelCard.from_template``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ._common import CARD_TAGS, PAPER_ARXIV, PAPER_TITLE
from .metadata import RANDOM_INIT, TeacherMetadata, base_model_hub_id

__all__ = ["CARD_TEMPLATE", "CITATION", "model_card"]

CARD_TEMPLATE = Path(__file__).with_name("card_template.md")
CITATION = f"""@article{{dong2025remem,
  title   = {{{PAPER_TITLE}}},
  author  = {{Dong and others}},
  journal = {{arXiv preprint arXiv:{PAPER_ARXIV}}},
  year    = {{2025}}
}}"""


def model_card(hf_config: dict, remem: dict, meta: TeacherMetadata, scales: dict[str, float],
               repo_id: str | None, adapter: bool = False) -> ModelCard:
    """The card of a teacher folder; ``scales`` (``{branch path: factor}``, or ``{}``) names each factor's branch.

    Example:
        >>> import timm, timm_remem
        >>> from timm_remem.hub.metadata import remem_block
        >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False), alpha=0.5, top_k=2)
        >>> meta = TeacherMetadata(dataset="cifar100", teacher_accuracy=91.5)
        >>> remem = remem_block(teacher, meta, merged=True)
        >>> card = model_card({"architecture": "test_vit", "num_classes": 1000}, remem, meta, {}, "alice/vit")
        >>> card.data.datasets, card.text.splitlines()[0]
        (['cifar100'], '# vit')
        >>> "| Reweighted blocks | top 2 |" in card.text and "| this teacher | 91.5 |" in card.text
        True
    """
    arch = hf_config["architecture"]
    name = repo_id.split("/")[1] if repo_id else f"{arch}-remem"
    return ModelCard.from_template(
        _card_data(meta, name, adapter),
        template_path=str(CARD_TEMPLATE),
        name=name,
        arch=arch,
        num_classes=hf_config["num_classes"],
        base_model=meta.base_model,
        base_hub_id=base_model_hub_id(meta.base_model),
        random_init=RANDOM_INIT,
        dataset=meta.dataset,
        hub_name=repo_id or "<namespace>/<name>",
        merged=remem["merged"],
        adapter=adapter,
        reweighted=bool(remem.get("factors")),
        factor_list=", ".join(f"{f:.6g}" for f in _in_weights(remem)),
        n_factors=len(remem.get("factors") or []),
        base_create=_create_name(meta.base_model),
        settings=_settings(remem, meta),
        factors=_factor_rows(remem, scales),
        evaluation=_evaluation_rows(meta),
        paper_arxiv=PAPER_ARXIV,
        citation=CITATION,
    )


def _card_data(meta: TeacherMetadata, name: str, adapter: bool = False) -> ModelCardData:
    """The YAML header: what the Hub indexes (library, task, tags, base model, dataset, license, results)."""
    accuracies = [("Top-1 accuracy (%)", meta.teacher_accuracy)] if meta.teacher_accuracy is not None else []
    accuracies += [(f"Top-1 accuracy (%) of a {student} student distilled from it", acc)
                   for student, acc in sorted(meta.student_accuracies.items())]
    results = [EvalResult(task_type="image-classification", dataset_type=meta.dataset, dataset_name=meta.dataset,
                          metric_type="accuracy", metric_value=acc, metric_name=what) for what, acc in accuracies]
    return ModelCardData(
        library_name="peft" if adapter else "timm", pipeline_tag="image-classification",
        tags=[*CARD_TAGS, "lora", "peft"] if adapter else list(CARD_TAGS), model_name=name,
        base_model=base_model_hub_id(meta.base_model), datasets=[meta.dataset] if meta.dataset else None,
        license=meta.license, eval_results=results or None,
    )


def _create_name(base_model: str | None) -> str | None:
    """The name ``timm.create_model`` takes for ``base_model`` (a Hub id gets the ``hf-hub:`` prefix)."""
    if base_model is None or base_model.startswith(("hf-hub:", "hf_hub:")) or "/" not in base_model:
        return base_model
    return f"hf-hub:{base_model}"


def _show(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _code(value: str | None) -> str | None:
    return None if value is None else f"`{value}`"


def _settings(remem: dict, meta: TeacherMetadata) -> list[tuple[str, str]]:
    """Rows of the "ReMem settings" table, values formatted."""
    rows = [
        ("Base model", _code(meta.base_model) or f"none: {RANDOM_INIT}"),
        ("Fine-tuning dataset", _code(meta.dataset)),
        ("SAM radius rho", meta.rho),
        ("Adaptive SAM", meta.adaptive),
        ("Epochs", meta.epochs),
        ("MLP reweighting", remem["reweighted"]),
    ]
    if remem["reweighted"]:
        rows += [
            ("MLP weight alpha", remem.get("alpha")),
            ("Schedule", _code(remem.get("schedule"))),
            ("Reweighted blocks", f"top {remem['top_k']}" if remem.get("top_k") else "all"),
            ("Learnable factors", remem.get("learnable")),
            ("Factors folded into the weights", remem["merged"]),
        ]
    rows.append(("timm-remem version", _code(remem["version"])))
    return [(key, _show(value)) for key, value in rows]


def _factor_rows(remem: dict, scales: dict[str, float]) -> list[tuple[int, str, str]]:
    """(block index, branch path, factor) of each reweighted block, bottom-up."""
    factors = _in_weights(remem)
    first = (remem.get("num_blocks") or len(factors)) - len(factors)
    paths = list(dict.fromkeys(scales)) if len(scales) == len(factors) else [""] * len(factors)
    return [(first + i, f"`{p}`" if p else "", f"{f:.6g}") for i, (p, f) in enumerate(zip(paths, factors, strict=True))]


def _evaluation_rows(meta: TeacherMetadata) -> list[tuple[str, str]]:
    """(model, top-1 %) of the teacher and of the students distilled from it."""
    rows = [("this teacher", f"{meta.teacher_accuracy:g}")] if meta.teacher_accuracy is not None else []
    rows += [(f"`{s}` student distilled from it", f"{a:g}") for s, a in sorted(meta.student_accuracies.items())]
    return rows


def _in_weights(remem: Mapping[str, Any]) -> list[float]:
    """The factors the weights hold in all: ``total_factors`` after a reweight of a merged model, else ``factors``."""
    return list(remem.get("total_factors") or remem.get("factors") or [])
