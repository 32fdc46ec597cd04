"""Build the serving image of one exported model version (Dockerfile.serve), push it, and record it in MLflow.

:func:`build_image` prepares a minimal build context (``serving/``, ``storage/``, the serving requirements,
the Dockerfile and the ONE model version, copied from a local or ``gs://`` base through :mod:`storage`),
then builds it with the Docker Engine when a daemon answers (``docker`` SDK ping; the build itself runs
``docker build`` with BuildKit, which the Dockerfile's ``RUN --mount`` needs), otherwise with buildah when
it is installed, otherwise it fails saying what to install. The image is tagged
``<registry>/<model_name>:v<version>`` plus a content tag (``c-<hash of the context>``), pushed when a
registry is configured, and its reference is set as tags on the MLflow run of that model version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import storage
from storage import versions

LOGGER = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = "Dockerfile.serve"
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
DEFAULT_PORT = 8501
IMAGE_NAME_PATTERN = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
CONTEXT_FILES = (
    "requirements/serving.txt",
    "scripts/fetch_model_version.py",
    "scripts/sourceless-imported.py",
    DOCKERFILE,
)
CONTEXT_PACKAGES = ("serving", "storage")
IGNORED_NAMES = ("__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache")

Builder = Literal["docker", "buildah"]
LogSink = Callable[[str], None]


class ImageBuildError(storage.TfloopError):
    """The image could not be prepared, built, pushed or inspected; the message says how to fix it."""


@dataclass(frozen=True)
class ImageSpec:
    """What to build: which model version, on which base, tagged for (and pushed to) which registry.

    ``push=None`` pushes when ``registry`` is set. ``tls_verify=None`` skips TLS checks for loopback
    registries only. ``ca_bundle`` is passed to the build as the ``cacert`` secret (TLS-intercepting proxy).
    ``storage_driver``/``storage_root``/``storage_runroot``/``isolation`` are buildah's global settings
    (None: buildah's own configuration). ``mlflow_tracking_uri=None`` skips the MLflow record.
    """

    model_base: str
    model_name: str
    version: int | None = None
    base_image: str = DEFAULT_BASE_IMAGE
    builder_image: str | None = None
    registry: str | None = None
    push: bool | None = None
    tls_verify: bool | None = None
    port: int = DEFAULT_PORT
    ca_bundle: Path | None = None
    model_uri_in_build: bool = False
    build_args: Mapping[str, str] = field(default_factory=dict)
    source_revision: str | None = None
    builder: Literal["auto", "docker", "buildah"] = "auto"
    storage_driver: str | None = None
    storage_root: Path | None = None
    storage_runroot: Path | None = None
    isolation: str | None = "chroot"
    layer_cache: bool = True
    mlflow_tracking_uri: str | None = None
    context_dir: Path | None = None


@dataclass(frozen=True)
class BuildContext:
    """A prepared build context folder and what it holds."""

    path: Path
    model_name: str
    version: int
    metadata: dict[str, Any]
    content_hash: str

    @property
    def run_id(self) -> str | None:
        run_id = self.metadata.get("run_id")
        return str(run_id) if run_id else None


@dataclass(frozen=True)
class BuiltImage:
    """A built (and maybe pushed) image: main reference, digest, uncompressed size and the tool used.

    ``digest`` is the registry's manifest digest when the image was pushed, else the local image ID.
    """

    image: str
    digest: str
    size_bytes: int
    builder: Builder
    tags: tuple[str, ...]
    pushed: bool
    model_name: str
    version: int
    run_id: str | None
    mlflow_note: str

    @property
    def pinned(self) -> str | None:
        """``<repository>@<manifest digest>`` of a pushed image (what a rollout deploys), else None."""
        if not self.pushed or not self.digest:
            return None
        return f"{self.image.rsplit(':', 1)[0]}@{self.digest}"

    def as_json(self) -> dict[str, Any]:
        """The ``tfloop build --json`` document."""
        return {
            "image": self.image,
            "digest": self.digest,
            "size_bytes": self.size_bytes,
            "builder": self.builder,
        }


def _log_to_logger(line: str) -> None:
    LOGGER.info(line)


# ---- context --------------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImageBuildError(f"cannot find the {name!r} package to put in the image; install tfloop first")
    return Path(next(iter(spec.submodule_search_locations)))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_hash(root: Path, extra: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{_file_digest(path)}\n".encode())
    for key in sorted(extra):
        digest.update(f"arg {key}={extra[key]}\n".encode())
    return digest.hexdigest()


def resolve_version(model_base: str, model_name: str, version: int | None) -> int:
    """The requested version if it is complete, else the latest complete one; raises when there is none."""
    if version is None:
        latest = versions.latest_version(model_base, model_name)
        if latest is None:
            raise ImageBuildError(
                f"no complete version of {model_name!r} under {model_base}; export one with `tfloop export` "
                "or check --model-base and --model-name"
            )
        return latest
    if not versions.is_complete(model_base, model_name, version):
        found = versions.complete_versions(model_base, model_name)
        raise ImageBuildError(
            f"version {version} of {model_name!r} under {model_base} is missing or incomplete (no "
            f"{versions.COMPLETE_MARKER}); complete versions: {found or 'none'}"
        )
    return version


def check_image_name(model_name: str) -> str:
    """The model name if it is a valid image repository name; raises with a fix otherwise."""
    if not IMAGE_NAME_PATTERN.match(model_name) or len(model_name) > 128:
        raise ImageBuildError(
            f"model name {model_name!r} cannot name an image: use lowercase letters, digits and single "
            "'.', '_' or '-' between them (e.g. 'flowers-v2')"
        )
    return model_name


def prepare_context(spec: ImageSpec, *, dest: Path) -> BuildContext:
    """Fill ``dest`` (empty or new) with exactly what Dockerfile.serve needs, the model version included.

    With ``spec.model_uri_in_build`` the model is not copied: the Dockerfile's model stage fetches it from
    the ``gs://`` version URI (passed as ``MODEL_URI``) itself.
    """
    check_image_name(spec.model_name)
    version = resolve_version(spec.model_base, spec.model_name, spec.version)
    version_uri = versions.version_uri(spec.model_base, spec.model_name, version)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ImageBuildError(f"the build context folder {dest} is not empty; pass a new or empty folder")
    for relative in CONTEXT_FILES:
        source = REPO_ROOT / relative
        if not source.is_file():
            raise ImageBuildError(
                f"{source} is missing: building images needs a tfloop source checkout (git clone) with "
                f"{', '.join(CONTEXT_FILES)}"
            )
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / relative)
    for package in CONTEXT_PACKAGES:
        shutil.copytree(_package_dir(package), dest / package, ignore=shutil.ignore_patterns(*IGNORED_NAMES))
    metadata_uri = storage.join(version_uri, versions.METADATA_FILE)
    metadata: dict[str, Any] = {}
    if storage.exists(metadata_uri):
        try:
            metadata = json.loads(storage.read_text(metadata_uri))
        except json.JSONDecodeError as error:
            raise ImageBuildError(
                f"{metadata_uri} is not valid JSON ({error}); export the version again"
            ) from error
    if spec.model_uri_in_build:
        if not storage.is_gcs(version_uri):
            raise ImageBuildError("fetching the model inside the build needs a gs:// --model-base")
        (dest / "model").mkdir()
    else:
        storage.copy_tree(version_uri, str(dest / "model"))
    content_hash = _tree_hash(dest, {"BASE_IMAGE": spec.base_image, "VERSION_URI": version_uri})
    return BuildContext(
        path=dest, model_name=spec.model_name, version=version, metadata=metadata, content_hash=content_hash
    )


# ---- tags and build arguments ---------------------------------------------------------------------------


def image_repository(spec: ImageSpec) -> str:
    """``<registry>/<model_name>`` (``localhost/<model_name>`` without a registry)."""
    registry = (spec.registry or "localhost").rstrip("/")
    return f"{registry}/{spec.model_name}"


def image_tags(spec: ImageSpec, context: BuildContext) -> tuple[str, str]:
    """The version tag ``<repo>:v<version>`` and the content tag ``<repo>:c-<12 hex>``."""
    repository = image_repository(spec)
    return f"{repository}:v{context.version}", f"{repository}:c-{context.content_hash[:12]}"


def _source_revision() -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def build_arguments(spec: ImageSpec, context: BuildContext) -> dict[str, str]:
    """The ``--build-arg`` values Dockerfile.serve reads."""
    arguments = {
        "BASE_IMAGE": spec.base_image,
        "BUILDER_IMAGE": spec.builder_image or spec.base_image,
        "MODEL_NAME": context.model_name,
        "MODEL_VERSION": str(context.version),
        "MLFLOW_RUN_ID": context.run_id or "",
        "SOURCE_REVISION": spec.source_revision if spec.source_revision is not None else _source_revision(),
        "CREATED": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "PORT": str(spec.port),
    }
    if spec.model_uri_in_build:
        arguments["MODEL_URI"] = versions.version_uri(spec.model_base, spec.model_name, context.version)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            arguments["STORAGE_EMULATOR_HOST"] = emulator
    arguments.update(spec.build_args)
    return arguments


def _wants_push(spec: ImageSpec) -> bool:
    if spec.push and not spec.registry:
        raise ImageBuildError("pushing needs a registry: pass --registry HOST:PORT (e.g. 127.0.0.1:5000)")
    return bool(spec.registry) if spec.push is None else spec.push


def _is_loopback_registry(registry: str) -> bool:
    host = registry.split("/", 1)[0].rsplit(":", 1)[0]
    return host in {"localhost", "::1", "[::1]"} or host.startswith("127.")


# ---- builders -------------------------------------------------------------------------------------------


def docker_available() -> bool:
    """True when a Docker Engine answers a ping (through the ``docker`` SDK)."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (DockerException, OSError):
        return False


def buildah_available() -> bool:
    """True when the ``buildah`` command is installed."""
    return shutil.which("buildah") is not None


def choose_builder(spec: ImageSpec) -> Builder:
    """Docker when a daemon answers, else buildah when installed, else an error saying what to install."""
    if spec.builder == "docker" or (spec.builder == "auto" and docker_available()):
        if spec.builder == "docker" and not docker_available():
            raise ImageBuildError("no Docker Engine answers; start it (or unset DOCKER_HOST) or use buildah")
        if shutil.which("docker") is None:
            raise ImageBuildError(
                "a Docker Engine answers but the `docker` CLI (with BuildKit/buildx) is missing; install "
                "docker-ce-cli and docker-buildx-plugin, or build with buildah"
            )
        return "docker"
    if buildah_available():
        return "buildah"
    raise ImageBuildError(
        "no image builder found: start a Docker Engine (https://docs.docker.com/engine/install/) or install "
        "buildah (`apt-get install buildah`, plus /etc/containers/policy.json) and run again"
    )


def _shared_build_flags(spec: ImageSpec, *, arguments: Mapping[str, str], tags: Sequence[str]) -> list[str]:
    """The flags that ``buildah build`` and ``docker build`` spell alike: CA secret, build args, tags."""
    flags: list[str] = []
    if spec.ca_bundle:
        flags += ["--secret", f"id=cacert,src={spec.ca_bundle}"]
    for key, value in arguments.items():
        flags += ["--build-arg", f"{key}={value}"]
    for tag in tags:
        flags += ["-t", tag]
    return flags


def _stream(command: Sequence[str], on_log: LogSink, *, env: Mapping[str, str] | None = None) -> int:
    """Run ``command``, passing each output line to ``on_log`` as it comes; returns the exit status."""
    try:
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else None,
        )
    except OSError as error:
        raise ImageBuildError(f"cannot run {command[0]}: {error}") from error
    assert process.stdout is not None
    with process.stdout:
        for line in process.stdout:
            on_log(line.rstrip("\n"))
    return process.wait()


def _run(command: Sequence[str], *, what: str) -> str:
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ImageBuildError(f"cannot {what}: {error}") from error
    if result.returncode != 0:
        raise ImageBuildError(f"cannot {what}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def buildah_global_options(spec: ImageSpec) -> list[str]:
    """buildah's storage options from the spec (empty: buildah's own configuration)."""
    options: list[str] = []
    if spec.storage_driver:
        options += ["--storage-driver", spec.storage_driver]
    if spec.storage_root:
        options += ["--root", str(spec.storage_root)]
    if spec.storage_runroot:
        options += ["--runroot", str(spec.storage_runroot)]
    return options


def _build_with_buildah(
    spec: ImageSpec, context: BuildContext, tags: Sequence[str], arguments: Mapping[str, str], on_log: LogSink
) -> str:
    buildah = ["buildah", *buildah_global_options(spec)]
    iidfile = context.path.parent / f".{context.path.name}.iid"
    command = [
        *buildah,
        "build",
        "--format",
        "docker",
        "-f",
        str(context.path / DOCKERFILE),
        "--iidfile",
        str(iidfile),
    ]
    if spec.isolation:
        command += ["--isolation", spec.isolation]
    if spec.layer_cache:
        command += ["--layers"]
    command += _shared_build_flags(spec, arguments=arguments, tags=tags)
    command.append(str(context.path))
    on_log("$ " + " ".join(command))
    status = _stream(command, on_log)
    if status != 0:
        raise ImageBuildError(
            f"buildah build failed (exit {status}); the build output above says which step. Behind a "
            "TLS-intercepting proxy pass the proxy's CA bundle (--ca-bundle); without network pass a base "
            "image that exists locally (--base-image, see scripts/make-base-image.sh)"
        )
    try:
        return iidfile.read_text().strip()
    finally:
        iidfile.unlink(missing_ok=True)


def buildah_image_size(spec: ImageSpec, ref: str) -> int:
    """Uncompressed size of an image in buildah's store, in bytes.

    buildah prints sizes rounded for people; podman (same store, same options) gives bytes, so it is asked
    first, and the rounded figure is the fallback.
    """
    if shutil.which("podman"):
        done = subprocess.run(
            ["podman", *buildah_global_options(spec), "image", "inspect", "--format", "{{.Size}}", ref],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode == 0 and done.stdout.strip().isdigit():
            return int(done.stdout.strip())
    output = _run(["buildah", *buildah_global_options(spec), "images", "--json", ref], what=f"inspect {ref}")
    entries = json.loads(output or "[]")
    if not entries:
        raise ImageBuildError(f"{ref} is not in buildah's store after the build")
    return parse_size(str(entries[0].get("size", "0")))


def parse_size(text: str) -> int:
    """Bytes from a size such as ``1046609327``, ``1.05 GB`` or ``980MB`` (decimal units, like buildah)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKMGT]?)i?B?\s*", text)
    if not match:
        raise ImageBuildError(f"cannot read the image size {text!r}")
    scale = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _push_with_buildah(spec: ImageSpec, tags: Sequence[str], on_log: LogSink) -> str:
    digest = ""
    verify = (
        spec.tls_verify if spec.tls_verify is not None else not _is_loopback_registry(spec.registry or "")
    )
    for tag in tags:
        with tempfile.NamedTemporaryFile(prefix="tfloop-digest-", delete=False) as handle:
            digestfile = Path(handle.name)
        try:
            command = [
                "buildah",
                *buildah_global_options(spec),
                "push",
                f"--tls-verify={'true' if verify else 'false'}",
                "--digestfile",
                str(digestfile),
                tag,
                f"docker://{tag}",
            ]
            on_log("$ " + " ".join(command))
            if _stream(command, on_log) != 0:
                raise ImageBuildError(
                    f"pushing {tag} failed; check that the registry {spec.registry} is running and reachable "
                    "(and --tls-verify for a registry without TLS)"
                )
            digest = digest or digestfile.read_text().strip()
        finally:
            digestfile.unlink(missing_ok=True)
    return digest


def _build_with_docker(
    spec: ImageSpec, context: BuildContext, tags: Sequence[str], arguments: Mapping[str, str], on_log: LogSink
) -> str:
    iidfile = context.path.parent / f".{context.path.name}.iid"
    command = ["docker", "build", "-f", str(context.path / DOCKERFILE), "--iidfile", str(iidfile)]
    command += _shared_build_flags(spec, arguments=arguments, tags=tags)
    command.append(str(context.path))
    on_log("$ " + " ".join(command))
    status = _stream(command, on_log, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    if status != 0:
        raise ImageBuildError(
            f"docker build failed (exit {status}); the build output above says which step. Behind a "
            "TLS-intercepting proxy pass the proxy's CA bundle (--ca-bundle)"
        )
    try:
        return iidfile.read_text().strip()
    finally:
        iidfile.unlink(missing_ok=True)


def _docker_size_and_push(
    spec: ImageSpec, tags: Sequence[str], push: bool, on_log: LogSink
) -> tuple[int, str]:
    import docker
    from docker.errors import APIError, DockerException

    client = docker.from_env()
    try:
        image = client.images.get(tags[0])
        size = int(image.attrs.get("Size", 0))
        if not push:
            return size, ""
        for tag in tags:
            repository, _, tag_name = tag.rpartition(":")
            for event in client.images.push(repository, tag=tag_name, stream=True, decode=True):
                if "error" in event:
                    raise ImageBuildError(f"pushing {tag} failed: {event['error']}")
                status = " ".join(str(event[k]) for k in ("id", "status", "progress") if event.get(k))
                if status:
                    on_log(status)
        image.reload()
        repo_digests = image.attrs.get("RepoDigests") or []
        digest = next(
            (d.split("@", 1)[1] for d in repo_digests if d.startswith(tags[0].rsplit(":", 1)[0] + "@")), ""
        )
        return size, digest
    except (APIError, DockerException) as error:
        raise ImageBuildError(f"the Docker Engine refused: {error}") from error
    finally:
        client.close()


# ---- MLflow ---------------------------------------------------------------------------------------------


def record_in_mlflow(
    *, tracking_uri: str | None, run_id: str | None, image: str, digest: str, pushed: bool = True
) -> str:
    """Tag the model version's MLflow run with the image; returns a note saying what was done or skipped.

    Tags: ``tfloop.image`` (reference), ``tfloop.image.digest`` and, for a pushed image,
    ``tfloop.image.pinned`` (``<repository>@<manifest digest>``, what a rollout should deploy).
    """
    if not tracking_uri:
        return "MLflow record skipped: no tracking URI configured"
    if not run_id:
        return "MLflow record skipped: the version's tfloop.json names no run_id"
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        client.set_tag(run_id, "tfloop.image", image)
        if digest:
            client.set_tag(run_id, "tfloop.image.digest", digest)
        if digest and pushed:
            repository = image.rsplit(":", 1)[0]
            client.set_tag(run_id, "tfloop.image.pinned", f"{repository}@{digest}")
    except MlflowException as error:
        return f"MLflow record skipped: run {run_id} not usable at {tracking_uri} ({error.message})"
    return f"MLflow run {run_id}: tagged tfloop.image={image}"


# ---- entry point ----------------------------------------------------------------------------------------


@dataclass
class _ContextDir:
    spec_dir: Path | None
    created: Path | None = None

    def __enter__(self) -> Path:
        if self.spec_dir is not None:
            return self.spec_dir
        self.created = Path(tempfile.mkdtemp(prefix="tfloop-image-"))
        return self.created / "context"

    def __exit__(self, *exc: object) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def build_image(spec: ImageSpec, *, on_log: LogSink = _log_to_logger) -> BuiltImage:
    """Prepare the context, build, tag, push (when configured) and record one model version's image.

    Build output goes line by line to ``on_log``. Raises :class:`ImageBuildError` (a ``TfloopError``) with
    what to fix when the version is missing, no builder is installed, or a step fails.
    """
    push = _wants_push(spec)
    builder = choose_builder(spec)
    with _ContextDir(spec.context_dir) as context_path:
        on_log(f"preparing the build context in {context_path}")
        context = prepare_context(spec, dest=context_path)
        tags = image_tags(spec, context)
        arguments = build_arguments(spec, context)
        on_log(f"building {tags[0]} ({context.model_name} v{context.version}) with {builder}")
        if builder == "buildah":
            image_id = _build_with_buildah(spec, context, tags, arguments, on_log)
            size = buildah_image_size(spec, tags[0])
            digest = _push_with_buildah(spec, tags, on_log) if push else ""
        else:
            image_id = _build_with_docker(spec, context, tags, arguments, on_log)
            size, digest = _docker_size_and_push(spec, tags, push, on_log)
    digest = digest or (image_id if image_id.startswith("sha256:") else f"sha256:{image_id}")
    note = record_in_mlflow(
        tracking_uri=spec.mlflow_tracking_uri,
        run_id=context.run_id,
        image=tags[0],
        digest=digest,
        pushed=push,
    )
    on_log(note)
    return BuiltImage(
        image=tags[0],
        digest=digest,
        size_bytes=size,
        builder=builder,
        tags=tuple(tags),
        pushed=push,
        model_name=context.model_name,
        version=context.version,
        run_id=context.run_id,
        mlflow_note=note,
    )
