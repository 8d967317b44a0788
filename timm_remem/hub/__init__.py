"""Publish ReMem teachers on the Hugging Face Hub in timm's format, and load them back (see docs/hub.md).

``save_pretrained`` writes a folder that plain timm loads, ``push_to_hub`` uploads it as one commit (then
``timm.create_model("hf-hub:org/name", pretrained=True)`` loads it) and ``load_teacher`` loads it back. Only
safetensors are written or read, and every failure of the Hub is one :class:`~timm_remem.errors.HubError`.

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
