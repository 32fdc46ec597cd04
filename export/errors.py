"""Errors of the export stage: each says what went wrong and how to fix it (all are ``TfloopError``)."""

from __future__ import annotations

from storage import TfloopError


class ExportError(TfloopError):
    """The export could not produce a SavedModel (bad model, bad labels, unreadable run)."""


class VerificationError(ExportError):
    """The exported SavedModel does not behave like the Keras model; nothing was published."""


class PublishError(ExportError):
    """A verified SavedModel could not be published as a new version."""


class RegistryError(ExportError):
    """The MLflow Model Registry refused an operation (unknown model, version or alias)."""


class PromotionError(RegistryError):
    """A version could not be made live (not complete, not registered, or the alias did not move)."""
