"""The MLflow Model Registry side of export: register published versions, move aliases, find the champion.

Each published SavedModel version becomes one registered model version (same model name), linked to its
training run, with tags naming the export URI, the integer serving version and the metrics, and
the alias ``challenger``. :func:`champion_version` tells the gate and the rollout which serving version is
the current champion.

:func:`promote_version` is promotion: it makes a serving version **live** by writing the live pointer
``<base>/<name>/live.json`` (what every serving replica reads; ``storage.versions``) and moves the alias
``champion`` to that version's registered version. The live pointer is the source of truth for what serves;
the alias records which model the gate compares candidates with. Both writes are idempotent, so running the
promotion again after a failure between them converges. :func:`promote` moves an alias alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import storage
from export.errors import PromotionError, RegistryError
from storage import versions

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_EXPORT_URI = "tfloop.export_uri"
TAG_SERVING_VERSION = "tfloop.serving_version"
TAG_METRIC_PREFIX = "tfloop.metric."
TAG_DATASET_FINGERPRINT = "tfloop.dataset_fingerprint"


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered model version as tfloop sees it."""

    model_name: str
    registered_version: int
    serving_version: int | None
    export_uri: str | None
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _from_model_version(version: ModelVersion) -> RegisteredVersion:
    tags = dict(version.tags or {})
    serving = tags.get(TAG_SERVING_VERSION)
    metrics = {}
    for key, value in tags.items():
        if key.startswith(TAG_METRIC_PREFIX):
            try:
                metrics[key[len(TAG_METRIC_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return RegisteredVersion(
        model_name=version.name,
        registered_version=int(version.version),
        serving_version=int(serving) if serving and serving.isdigit() else None,
        export_uri=tags.get(TAG_EXPORT_URI),
        run_id=version.run_id or None,
        metrics=metrics,
        aliases=tuple(version.aliases or ()),
    )


def register_version(
    *,
    tracking_uri: str,
    model_name: str,
    run_id: str | None,
    export_uri: str,
    serving_version: int,
    metrics: Mapping[str, float] | None = None,
    dataset_fingerprint: str | None = None,
    alias: str | None = CHALLENGER,
) -> RegisteredVersion:
    """Register a published SavedModel version (creating the registered model if needed); set ``alias``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        try:
            client.get_registered_model(model_name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                client.create_registered_model(
                    model_name, description="Image classifier exported by tfloop (SavedModel versions)."
                )
            except MlflowException as create_error:
                if create_error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        tags = {TAG_EXPORT_URI: export_uri, TAG_SERVING_VERSION: str(serving_version)}
        tags.update(
            {f"{TAG_METRIC_PREFIX}{key}": str(float(value)) for key, value in (metrics or {}).items()}
        )
        if dataset_fingerprint:
            tags[TAG_DATASET_FINGERPRINT] = dataset_fingerprint
        description = f"SavedModel serving version {serving_version} at {export_uri}"
        try:
            version = client.create_model_version(
                name=model_name, source=export_uri, run_id=run_id, tags=tags, description=description
            )
        except MlflowException as error:
            # An MLflow server refuses local paths outside the run's artifacts as a source; the run's
            # model is then the source and the export URI stays in the tfloop.export_uri tag.
            if not run_id or error.error_code != "INVALID_PARAMETER_VALUE" or "source" not in error.message:
                raise
            version = client.create_model_version(
                name=model_name,
                source=f"runs:/{run_id}/model",
                run_id=run_id,
                tags=tags,
                description=description,
            )
        if alias:
            client.set_registered_model_alias(model_name, alias, str(version.version))
        return _from_model_version(client.get_model_version(model_name, str(version.version)))
    except MlflowException as error:
        raise RegistryError(
            f"cannot register {model_name} serving version {serving_version} in the MLflow registry at "
            f"{tracking_uri}: {error.message}. Check the tracking URI (MLFLOW_TRACKING_URI) and that the "
            "server is reachable; the SavedModel itself is published."
        ) from error


def promote(model_name: str, registered_version: int, *, tracking_uri: str, alias: str = CHAMPION) -> None:
    """Point ``alias`` (default ``champion``) at ``registered_version`` of ``model_name``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_model_version(model_name, str(registered_version))
        client.set_registered_model_alias(model_name, alias, str(registered_version))
    except MlflowException as error:
        raise RegistryError(
            f"cannot set alias {alias!r} of {model_name} to version {registered_version}: {error.message}. "
            f"List the versions with `mlflow models` or the MLflow UI and pass one that exists."
        ) from error


def version_by_alias(model_name: str, *, tracking_uri: str, alias: str) -> RegisteredVersion | None:
    """The registered version behind ``alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        return _from_model_version(client.get_model_version_by_alias(model_name, alias))
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            return None
        raise RegistryError(
            f"cannot read alias {alias!r} of {model_name} from the MLflow registry at {tracking_uri}: "
            f"{error.message}"
        ) from error


def champion_version(
    model_name: str, *, tracking_uri: str, alias: str = CHAMPION
) -> RegisteredVersion | None:
    """The current champion (serving version, export URI, metrics), or None before the first promotion."""
    return version_by_alias(model_name, tracking_uri=tracking_uri, alias=alias)


def registered_version(model_name: str, version: int, *, tracking_uri: str) -> RegisteredVersion:
    """One registered version by number; RegistryError when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return _from_model_version(_client(tracking_uri).get_model_version(model_name, str(version)))
    except MlflowException as error:
        raise RegistryError(f"{model_name} has no registered version {version}: {error.message}") from error


def _same_uri(left: str | None, right: str) -> bool:
    if not left:
        return False
    if storage.is_gcs(left) or storage.is_gcs(right):
        return left.rstrip("/") == right.rstrip("/")
    return storage.local_path(left).resolve() == storage.local_path(right).resolve()


def _search(model_name: str, *, tracking_uri: str, filter_string: str) -> list[RegisteredVersion]:
    from mlflow.exceptions import MlflowException

    try:
        found = _client(tracking_uri).search_model_versions(filter_string)
    except MlflowException as error:
        raise RegistryError(
            f"cannot search the registered versions of {model_name} in the MLflow registry at "
            f"{tracking_uri}: {error.message}. Check the tracking URI (MLFLOW_TRACKING_URI)."
        ) from error
    return [_from_model_version(version) for version in found]


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_registered_version(
    *, model_name: str, export_uri: str, tracking_uri: str, run_id: str | None = None
) -> RegisteredVersion | None:
    """The registered version of ``model_name`` whose ``tfloop.export_uri`` is ``export_uri`` (the lowest
    number when several are), or None. ``run_id`` narrows the search to that run's versions."""
    query = f"name='{_quoted(model_name)}'"
    if run_id:
        query += f" and run_id='{_quoted(run_id)}'"
    matches = [
        entry
        for entry in _search(model_name, tracking_uri=tracking_uri, filter_string=query)
        if _same_uri(entry.export_uri, export_uri)
    ]
    return min(matches, key=lambda entry: entry.registered_version) if matches else None


@dataclass(frozen=True)
class Promotion:
    """A promoted version: the live pointer's content and the registered version behind ``champion``."""

    model_name: str
    version: int
    registered_version: int
    previous: int | None
    live_pointer: str
    promoted_at: str
    alias: str
    pointer_written: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "registered_version": self.registered_version,
            "previous": self.previous,
            "live_pointer": self.live_pointer,
            "promoted_at": self.promoted_at,
            "alias": self.alias,
            "pointer_written": self.pointer_written,
        }


def promote_version(
    *,
    model_name: str,
    model_base: str,
    version: int,
    tracking_uri: str,
    promoted_by: str = "",
    alias: str = CHAMPION,
) -> Promotion:
    """Make serving version ``version`` live: write ``<base>/<name>/live.json`` and move ``alias`` to it.

    Checks first, then writes (nothing is written when a check fails): the version must be complete under
    ``model_base`` and registered (a registered version whose ``tfloop.export_uri`` is the version's URI).
    The pointer is written first (it is what serving reads: the source of truth for what is live), then
    the alias. A pointer that already names the version is left as it is, so a retry after the alias
    failed only moves the alias. Raises :class:`PromotionError` with what to do.
    """
    uri = versions.version_uri(model_base, model_name, version)
    if not versions.is_complete(model_base, model_name, version):
        complete = versions.complete_versions(model_base, model_name)
        raise PromotionError(
            f"version {version} of {model_name} is not complete under "
            f"{versions.model_uri(model_base, model_name)} (no {versions.COMPLETE_MARKER}); complete "
            f"versions: {complete or 'none'}. Export a run first (`tfloop export --run RUN_ID`) or pass "
            "one of the complete versions."
        )
    entry = find_registered_version(model_name=model_name, export_uri=uri, tracking_uri=tracking_uri)
    if entry is None:
        raise PromotionError(
            f"version {version} of {model_name} ({uri}) is not registered in the MLflow registry at "
            f"{tracking_uri}; export its run again with `tfloop export --run RUN_ID --base {model_base}` "
            "(an exported run is not published twice: that registers the existing version) and promote again"
        )
    current = versions.read_live_pointer(model_base, model_name)
    if current is not None and current.version == version:
        pointer, written = current, False
    else:
        pointer, written = (
            versions.write_live_pointer(model_base, model_name, version, promoted_by=promoted_by),
            True,
        )
    try:
        promote(model_name, entry.registered_version, tracking_uri=tracking_uri, alias=alias)
    except RegistryError as error:
        raise PromotionError(
            f"version {version} of {model_name} is live ({versions.live_pointer_uri(model_base, model_name)} "
            f"names it) but the alias {alias!r} was not moved: {error}. Run the same promotion again "
            f"(`tfloop promote {version} --model-name {model_name} --model-base {model_base}`) to move it."
        ) from error
    return Promotion(
        model_name=model_name,
        version=version,
        registered_version=entry.registered_version,
        previous=pointer.previous,
        live_pointer=versions.live_pointer_uri(model_base, model_name),
        promoted_at=pointer.promoted_at,
        alias=alias,
        pointer_written=written,
    )
