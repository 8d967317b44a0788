"""Publish ReMem teachers on the Hugging Face Hub in timm's format, and load them back.

``save_pretrained`` writes a folder that plain timm loads (``timm.create_model("local-dir:DIR", pretrained=True)``):
``config.json`` (architecture, ``num_classes``, ``model_args``, ``pretrained_cfg`` and a ``remem`` block with the
reweighting and training settings), ``model.safetensors`` and ``README.md``, a model card built with
huggingface_hub's ``ModelCard``. ``push_to_hub`` uploads that folder as one commit, so that anyone loads the teacher
with ``timm.create_model("hf-hub:org/name", pretrained=True)``. ``load_teacher`` loads it back, with the reweighting
wrappers and their exact factors when it was saved with ``merge=False``.

Only safetensors are written or read (never a pickle), keys are checked strictly, and every failure of the Hub
(bad or missing token, foreign namespace, missing repository, revision or file, network) surfaces as one
:class:`~timm_remem.errors.HubError` that says what happened and what to do.

The room, one concern per file: ``metadata`` (:class:`TeacherMetadata` and the ``remem`` block of ``config.json``),
``io`` (:func:`save_pretrained`, :func:`fetch_teacher_files`, :func:`load_teacher`), ``push``
(:func:`push_to_hub`), ``card`` (the model card, rendered from ``card_template.md``) and ``errors`` (the Hub's
errors turned into one :class:`~timm_remem.errors.HubError`).

Example:
    >>> import tempfile, timm, torch, timm_remem
    >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
    >>> folder = timm_remem.save_pretrained(teacher, tempfile.mkdtemp(), dataset="cifar100", rho=0.1)
    >>> plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.allclose(plain(x), teacher.eval()(x), atol=1e-5)
    True
"""

from ._common import CARD_NAME, CARD_TAGS, CONFIG_NAME, PAPER_ARXIV, PAPER_TITLE, WEIGHTS_NAME, check_repo_id
from .io import fetch_teacher_files, load_teacher, save_pretrained
from .metadata import TeacherMetadata
from .push import push_to_hub

__all__ = ["TeacherMetadata", "save_pretrained", "push_to_hub", "load_teacher", "fetch_teacher_files",
           "WEIGHTS_NAME", "CONFIG_NAME", "CARD_NAME", "PAPER_TITLE", "PAPER_ARXIV", "CARD_TAGS", "check_repo_id"]
