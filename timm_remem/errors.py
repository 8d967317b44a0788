"""Exceptions raised by timm-remem.

Every error says what was expected, what was received and how to fix it. The classes also derive from the
built-in exception a caller would naturally catch (``ValueError`` for bad arguments, ``RuntimeError`` for
failures while running), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["RememError", "ConfigError", "UnsupportedModelError", "NotReweightedError", "HubError", "CheckpointError",
           "TrainingError"]


class RememError(Exception):
    """Base class of every error raised on purpose by timm-remem."""


class ConfigError(RememError, ValueError):
    """An argument or configuration value is out of range, of the wrong type or inconsistent."""


class UnsupportedModelError(RememError, ValueError):
    """The model lacks the structure an operation needs (for example, no transformer MLP branch)."""


class NotReweightedError(RememError, ValueError):
    """An operation that needs a reweighted model (``merge``, ``unreweight``) got a plain one."""


class HubError(RememError, RuntimeError):
    """Talking to a Hugging Face Hub (or a compatible server) failed; the message says why and what to do."""


class CheckpointError(RememError, RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not match the model it is loaded into."""


class TrainingError(RememError, RuntimeError):
    """Training cannot go on (for example a non-finite loss); checkpoints already written are kept."""
