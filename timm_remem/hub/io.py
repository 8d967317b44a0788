"""Write a teacher folder in timm's Hugging Face format, find one (a folder or the Hub), and load it back."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import save_for_hf
from timm.utils import unwrap_model
from torch import nn

from .._io import EXPORT_FILES, OutputClaim, atomic_write_text, claim_output_dir, os_error_reason, write_into
from .._models import model_input_config
from .._peft import unwrap_peft as timm_model_of
from .._validation import check_bool
from .._version import __version__
from ..errors import CheckpointError, ConfigError, HubError
from ..lora import is_lora as has_adapters
from ..lora import merged_copy, save_adapter
from ..reweighting import check_factors, get_scales, is_reweighted, restore_reweight_config, reweight
from ..reweighting import merge as merge_factors
from ._common import CARD_NAME, CONFIG_NAME, REMEM_NAME, WEIGHTS_NAME, check_repo_id, check_revision, check_timm_model
from ._network import HubLimits
from .card import model_card
from .errors import find_in_chain, hub_errors
from .metadata import (
    TeacherMetadata,
    metadata_from_fields,
    remem_block,
    reweight_config_from_block,
    rewrite_pretrained_cfg,
)

__all__ = ["save_pretrained", "load_teacher", "fetch_teacher_files"]

_HUB_PREFIXES = ("hf-hub:", "hf_hub:")
_LOCAL_PREFIX = "local-dir:"


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    merge: bool = True,
    adapter_only: bool = False,
    metadata: TeacherMetadata | None = None,
    repo_id: str | None = None,
    data_config: dict[str, Any] | None = None,
    **fields: Any,
) -> Path:
    """Write a teacher to ``path`` in timm's Hugging Face format, with a ReMem model card (see docs/hub.md).

    The folder (``config.json``, ``model.safetensors``, ``README.md``) loads in plain timm
    (``timm.create_model("local-dir:DIR", pretrained=True)``); a LoRA teacher is written merged. A wrapper
    (``torch.compile``, DDP) is saved as the model it wraps. The files are renamed into place (``config.json``
    last), so a failed save leaves the folder's previous files as they were.

    Args:
        model: A timm model, reweighted (see :func:`timm_remem.reweight`) or not.
        path: Folder to write: missing, empty, or a model folder timm-remem wrote (its files are replaced).
        merge: Fold the factors into a copy of the weights, or keep them (``...remem_scale`` tensors).
        adapter_only: For a ``peft.PeftModel``: write the adapter alone in peft's format (needs ``base_model``).
        metadata: Training metadata; the keyword ``fields`` override its values.
        repo_id: Hub id the folder is meant for (``"namespace/name"``), recorded as ``hf_hub_id``.
        data_config: Preprocessing to record, as ``timm.models.save_for_hf`` takes it (default: the input size).
        **fields: :class:`TeacherMetadata` fields. Give ``base_model`` only when the teacher started from those
            pretrained weights: ``None`` records "trained from random initialisation".

    Returns:
        The folder written.

    Raises:
        ConfigError: Unknown or invalid metadata, a malformed ``repo_id``, ``adapter_only=True`` without a peft
            adapter or ``base_model``, or a folder that is not timm-remem's to write (see ``path``).
        UnsupportedModelError: ``model`` is not a timm model.
        CheckpointError: A write failed (a full disk, a read-only folder); the folder's earlier files are kept.

    Example:
        >>> import tempfile, json, timm, timm_remem
        >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
        >>> folder = timm_remem.save_pretrained(teacher, tempfile.mkdtemp(), merge=False, rho=0.1)
        >>> remem = json.loads((folder / "config.json").read_text())["remem"]
        >>> remem["alpha"], remem["merged"], remem["rho"]
        (0.8, False, 0.1)
    """
    model = _unwrapped(model)
    meta = metadata_from_fields(metadata, fields)
    check_bool("merge", merge)
    check_bool("adapter_only", adapter_only)
    if repo_id is not None:
        check_repo_id(repo_id)
    adapted = has_adapters(model)
    timm_model = timm_model_of(model) if adapted else model
    check_timm_model(timm_model)
    if adapter_only and meta.base_model is None:
        raise ConfigError(
            "adapter_only=True needs base_model=...: a LoRA adapter only reproduces the teacher on the exact weights "
            "it was trained on, and this teacher records none (base_model=None: trained from random "
            "initialisation). Publish the merged checkpoint (adapter_only=False), or pass the pretrained base it "
            "adapts, e.g. base_model='vit_base_patch16_224.augreg_in21k'."
        )
    claim = claim_output_dir(path, "export", what="path")
    with _writing(claim):
        if adapter_only:
            written = _save_adapter(model, timm_model, claim.path, meta, repo_id)
        else:
            written = _save_merged(model, timm_model, adapted, claim.path, meta, repo_id, merge, data_config)
        _remove_other_exports(claim.path, {p.name for p in written})
    return claim.path


def _remove_other_exports(folder: Path, written: set[str]) -> None:
    """A folder holds one export: remove the export files this save did not write (peft or load_teacher would
    read them)."""
    for name in EXPORT_FILES:
        stale = folder / name
        if name not in written and (stale.is_file() or stale.is_symlink()):
            stale.unlink()  # a symlink is removed, its target left alone


def _unwrapped(model: Any) -> Any:
    """The model inside ``torch.compile`` / DDP / ``DataParallel`` wrappers; any other object as it is."""
    while isinstance(model, nn.Module) and (
            (type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"))
            or isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))):
        model = unwrap_model(model)
    return model


@contextlib.contextmanager
def _writing(claim: OutputClaim):
    """A failed write becomes a ``CheckpointError``; a folder created for this save is removed if still empty."""
    try:
        yield
    except BaseException as err:
        if claim.created:
            with contextlib.suppress(OSError):
                claim.path.rmdir()  # only when empty
        if isinstance(err, OSError):
            raise CheckpointError(
                f"could not write the teacher folder {str(claim.path)!r}: {os_error_reason(err)}. Free disk space or "
                "make the folder writable (or choose another path); its earlier files are kept"
            ) from err
        raise


def _save_merged(model: nn.Module, timm_model: nn.Module, adapted: bool, folder: Path, meta: TeacherMetadata,
                 repo_id: str | None, merge: bool, data_config: dict[str, Any] | None) -> list[Path]:
    """The folder of a plain timm checkpoint: config.json, model.safetensors, README.md."""
    plain = merged_copy(model) if adapted else timm_model  # LoRA folded by peft, on a copy
    check_factors(plain)  # no NaN/inf factor or scaled weight is ever exported
    wrapped = is_reweighted(plain)
    remem = remem_block(plain, meta, merged=merge or not wrapped)
    if adapted:
        remem["lora"] = "merged"
    scales = get_scales(plain) if wrapped else {}
    weights = merge_factors(plain if adapted else copy.deepcopy(plain)) if merge and wrapped else plain
    if data_config is None:
        data_config = {"input_size": model_input_config(plain)}

    def write(tmp: Path) -> None:  # a fresh private folder; write_into renames the files into place
        save_for_hf(weights, str(tmp), model_config={"remem": remem}, safe_serialization=True, data_config=data_config)
        config_file = tmp / CONFIG_NAME
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
        rewrite_pretrained_cfg(hf_config["pretrained_cfg"], plain, meta, repo_id)
        atomic_write_text(config_file, json.dumps(hf_config, indent=2) + "\n", fsync=False)
        card = model_card(hf_config, remem, meta, scales, repo_id)
        atomic_write_text(tmp / CARD_NAME, str(card), fsync=False)

    return write_into(folder, write, last=(CONFIG_NAME,))  # the umask's permissions (timm writes the weights 0600)


def _save_adapter(model: nn.Module, timm_model: nn.Module, folder: Path, meta: TeacherMetadata,
                  repo_id: str | None) -> list[Path]:
    """The folder of ``adapter_only=True``: peft's adapter files, the factors (if any) and an adapter card."""
    check_factors(timm_model)
    wrapped = is_reweighted(timm_model)
    remem = remem_block(timm_model, meta, merged=False)
    remem["lora"] = "adapter"
    hf_config = {"architecture": timm_model.pretrained_cfg.get("architecture"), "num_classes": timm_model.num_classes}
    card = model_card(hf_config, remem, meta, get_scales(timm_model) if wrapped else {}, repo_id, adapter=True)

    def write(tmp: Path) -> None:  # a fresh private folder; write_into renames the files into place
        save_adapter(model, tmp)
        if wrapped:
            atomic_write_text(tmp / REMEM_NAME, json.dumps({"remem": remem}, indent=2) + "\n", fsync=False)
        atomic_write_text(tmp / CARD_NAME, str(card), fsync=False)

    return write_into(folder, write)


def fetch_teacher_files(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
    retry_budget: float | None = None,
) -> Path:
    """The local folder that holds a teacher's ``config.json`` and ``model.safetensors``, downloading if needed.

    Takes the arguments of :func:`load_teacher`; returns the folder (for ``hf-hub:``, the snapshot in the Hub cache).

    Raises:
        ConfigError: A bad ``name_or_path`` or revision, or two revisions (before any request or file access).
        HubError: The repository, revision or ``config.json`` cannot be fetched (with the reason), or a file lies
            outside the Hub cache (nothing is read then).
        CheckpointError: ``model.safetensors`` is missing.

    Example:
        >>> fetch_teacher_files("no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: 'no/such/folder' is not an existing folder: give a folder written by ...
    """
    limits = HubLimits.resolve(timeout, retry_budget)
    return _resolve(name_or_path, revision, token, cache_dir, limits)[0]


def _resolve(name_or_path: Any, revision: str | None, token: str | None, cache_dir: Any,
             limits: HubLimits) -> tuple[Path, str | None, str | None]:
    """Local folder holding config.json and model.safetensors, plus the repo id and revision for hf-hub sources."""
    text = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if text is None:
        raise ConfigError(f"name_or_path must be a string or a path, got {type(name_or_path).__name__}.")
    if revision is not None:
        check_revision(revision)
    if text.startswith(_HUB_PREFIXES):
        repo_id, marked, at = text.split(":", 1)[1].partition("@")
        if marked:
            check_revision(at, f"the revision after '@' in {text!r}")
            if revision is not None and at != revision:
                raise ConfigError(f"two revisions given: {at!r} in {text!r} and revision={revision!r}; keep one.")
            revision = at
        check_repo_id(repo_id)
        return _download(repo_id, revision, token, cache_dir, limits), repo_id, revision
    folder = Path(text[len(_LOCAL_PREFIX):] if text.startswith(_LOCAL_PREFIX) else text).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{text!r} is not an existing folder: give a folder written by save_pretrained, 'local-dir:DIR', or "
            "'hf-hub:namespace/name' for the Hugging Face Hub."
        )
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / required).is_file():
            error = HubError if required == CONFIG_NAME else CheckpointError
            raise error(
                f"{str(folder / required)!r} is missing: a teacher folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(timm-remem reads safetensors only, never pickle files); write it with timm_remem.save_pretrained."
            )
    return folder, None, None


def _download(repo_id: str, revision: str | None, token: str | None, cache_dir: Any, limits: HubLimits) -> Path:
    paths = {}
    with hub_errors("download", repo_id, revision, constants.ENDPOINT, limits=limits):
        for filename in (CONFIG_NAME, WEIGHTS_NAME):
            try:
                paths[filename] = _inside_cache(hf_hub_download(
                    repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                    library_name="timm-remem", library_version=__version__,
                ), cache_dir, repo_id)
            except Exception as err:
                if filename == WEIGHTS_NAME and find_in_chain(err, RemoteEntryNotFoundError):
                    raise CheckpointError(
                        f"the Hub repository {repo_id!r} has no {WEIGHTS_NAME}: timm-remem loads safetensors "
                        "weights only (never pickle files such as pytorch_model.bin); re-publish it with "
                        "timm_remem.push_to_hub."
                    ) from None
                raise
    folder = paths[CONFIG_NAME].parent
    if paths[WEIGHTS_NAME].parent != folder:  # both come from one snapshot of the cache
        raise CheckpointError(f"{CONFIG_NAME} and {WEIGHTS_NAME} of {repo_id!r} resolved to different revisions; "
                              "pass an explicit revision (a commit id).")
    return folder


def _inside_cache(path: str, cache_dir: Any, repo_id: str) -> Path:
    """``path`` once it is known to lie in the Hub cache, symlinks resolved: the cache's file names come from the
    server (commit id, ``ETag``), so a hostile one can make huggingface_hub link a file outside the cache."""
    cache = Path(constants.HF_HUB_CACHE if cache_dir is None else cache_dir).expanduser().resolve()
    given = Path(os.path.abspath(path))
    target = given.resolve()
    if not (given.is_relative_to(cache) and target.is_relative_to(cache)):
        raise HubError(
            f"huggingface_hub handed back {str(given)!r} for {repo_id!r}, which leads to {str(target)!r}, outside "
            f"the Hub cache {str(cache)!r}: the server at {constants.ENDPOINT} sent a file tag or commit id that "
            "points out of the cache, so nothing was read. Point HF_ENDPOINT at a Hugging Face Hub you trust, and "
            f"delete {str(target)!r} unless you put it there."
        )
    return given


def load_teacher(
    name_or_path: str | os.PathLike,
    *,
    merge: bool = False,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
    retry_budget: float | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Load a teacher written by :func:`save_pretrained` / :func:`push_to_hub` (or any timm Hub-format model).

    The weights are read from ``model.safetensors`` only (never a pickle), with a strict key check. A teacher saved
    with ``merge=False`` comes back reweighted with its exact factors (learnable ones stay learnable); for a merged
    one, :func:`timm_remem.get_reweight_config` still reports its settings (``merged=True``).

    Args:
        name_or_path: ``"hf-hub:namespace/name"`` (optionally ``@revision``), ``"local-dir:DIR"`` or a folder.
        merge: Fold kept factors into the weights and return a plain timm model.
        revision: Branch, tag or commit for ``hf-hub:`` (same as ``@revision`` in the name).
        token: Token for private repositories (default: ``HF_TOKEN`` or the stored login).
        cache_dir: Hub cache folder (default: huggingface_hub's). With ``HF_HUB_OFFLINE=1`` cached files are used.
        timeout: Seconds without a byte before a request fails (default: ``TIMM_REMEM_HUB_TIMEOUT`` or 10).
        retry_budget: Seconds of retries after a first failure (default: ``TIMM_REMEM_HUB_RETRY_BUDGET`` or 45).
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The teacher in eval mode, with ``pretrained_cfg`` describing its preprocessing.

    Raises:
        ConfigError: A bad ``name_or_path`` or revision (checked before any request or file access).
        HubError: As for :func:`fetch_teacher_files`.
        CheckpointError: ``model.safetensors`` is missing or unreadable, or its keys or shapes do not match.

    Example:
        >>> import tempfile, timm, timm_remem
        >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
        >>> folder = timm_remem.save_pretrained(teacher, tempfile.mkdtemp(), merge=False)
        >>> timm_remem.get_scales(timm_remem.load_teacher(folder)) == timm_remem.get_scales(teacher)
        True
    """
    limits = HubLimits.resolve(timeout, retry_budget)
    folder, repo_id, revision = _resolve(name_or_path, revision, token, cache_dir, limits)
    hf_config = _read_config(folder / CONFIG_NAME)
    remem = hf_config.get("remem") or {}
    model = timm.create_model(f"local-dir:{folder}", pretrained=False, **model_kwargs)
    saved = reweight_config_from_block(remem)
    if saved is not None and not remem.get("merged", True):
        top = saved.factors
        reweight(model, schedule=top, top_k=len(top) if saved.top_k is not None else None, learnable=saved.learnable,
                 allow_amplify=True, allow_zero=True)  # trained learnable factors may leave (0, 1]
    _load_weights(model, folder / WEIGHTS_NAME, name_or_path)
    if saved is not None:
        # The remem block is a record, not an instruction: checked against the loaded model (a warning names any
        # disagreement); the model's own factors win.
        restore_reweight_config(model, saved)
        if merge and is_reweighted(model):
            merge_factors(model)
    cfg = model.pretrained_cfg
    if repo_id is not None:
        cfg.pop("file", None)
        cfg.update(hf_hub_id=repo_id if revision is None else f"{repo_id}@{revision}", source="hf-hub")
    return model.eval()


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({err}): the download is corrupt or the file "
                              "was edited; write it again with timm_remem.save_pretrained.") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{str(path)!r} has no 'architecture': it is not a timm model config.")
    return config


def _load_weights(model: nn.Module, path: Path, source: Any) -> None:
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r} is unreadable ({err}): it is corrupt or truncated; download or save "
                              "it again.") from None
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{label} {items}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
        raise CheckpointError(
            f"the weights of {os.fspath(source)!r} do not match the {model.pretrained_cfg.get('architecture')} that "
            f"its config.json describes: {'; '.join(problems)}. The files come from different models or were "
            "edited (or model_kwargs changed the architecture); save the teacher again with "
            "timm_remem.save_pretrained."
        )
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)
