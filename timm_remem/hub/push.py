"""Publish a teacher on the Hugging Face Hub as one commit, loadable with ``timm.create_model("hf-hub:...")``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from torch import nn

from .._version import __version__
from ..errors import HubError
from ._common import check_repo_id, check_revision
from ._network import HubLimits
from .errors import TOKEN_HELP, hub_errors
from .io import save_pretrained
from .metadata import TeacherMetadata

__all__ = ["push_to_hub"]


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    merge: bool = True,
    adapter_only: bool = False,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    metadata: TeacherMetadata | None = None,
    data_config: dict[str, Any] | None = None,
    timeout: float | None = None,
    retry_budget: float | None = None,
    **fields: Any,
) -> str:
    """Publish a teacher on the Hugging Face Hub, loadable with ``timm.create_model("hf-hub:<repo_id>")``.

    Writes the folder of :func:`save_pretrained` (same ``merge``, ``adapter_only``, ``metadata``, ``data_config``
    and ``fields``) to a temporary directory and uploads it as one commit: an interrupted push publishes nothing.

    Args:
        repo_id: ``"namespace/name"``: your user name or an organisation where you may write.
        private: Create the repository private (applies only when it is created).
        token: Hugging Face token with the write role (default: ``HF_TOKEN`` or the token of ``hf auth login``).
        revision: Branch to commit to (default ``main``); created from ``main`` when missing.
        commit_message: Commit title (default: ``"Upload ReMem teacher <architecture>"``).
        timeout: Seconds without a byte before a request fails (default: ``TIMM_REMEM_HUB_TIMEOUT`` or 10).
        retry_budget: Seconds of retries after a first failure (default: ``TIMM_REMEM_HUB_RETRY_BUDGET`` or 45).

    Returns:
        The URL of the commit.

    Raises:
        HubError: No token, a token the Hub rejects or that cannot write to ``repo_id``'s namespace, or the Hub
            cannot be reached.
        ConfigError: Malformed ``repo_id``, ``revision`` or metadata (checked before anything is sent).

    Example:
        >>> url = timm_remem.push_to_hub(teacher, "me/vit-b-remem-cifar100", dataset="cifar100")  # doctest: +SKIP
        >>> push_to_hub(object(), "not a repo id", token="hf_x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: repo_id must be 'namespace/name' (...), got 'not a repo id'.
    """
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    limits = HubLimits.resolve(timeout, retry_budget)
    token = token or get_token()
    if not token:
        raise HubError(f"pushing to {repo_id!r} needs a Hugging Face token with the write role: {TOKEN_HELP}.")
    with tempfile.TemporaryDirectory(prefix="timm-remem-push-") as folder:
        save_pretrained(model, folder, merge=merge, adapter_only=adapter_only, metadata=metadata, repo_id=repo_id,
                        data_config=data_config, **fields)
        what = "LoRA adapter of ReMem teacher" if adapter_only else "ReMem teacher"
        message = commit_message or f"Upload {what} {model.pretrained_cfg.get('architecture') or ''}".strip()
        api = HfApi(token=token, library_name="timm-remem", library_version=__version__)
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        additions = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files]
        with hub_errors("push to", repo_id, revision, api.endpoint, pushing=True, limits=limits):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != constants.DEFAULT_REVISION:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            # What upload_folder does, but one file at a time: with two or more large (LFS) files huggingface_hub
            # uploads from worker threads of its own, which would not run under this push's limits (_network.py).
            for addition in additions:
                api.preupload_lfs_files(repo_id, additions=[addition], revision=revision)
            info = api.create_commit(repo_id, additions, commit_message=message, revision=revision)
    return info.commit_url
