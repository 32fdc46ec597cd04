"""Place one exported model version at ``<dest>/<name>/<version>/`` and check that it is complete.

Runs inside Dockerfile.serve's model stage (with the context's ``storage/`` package on ``PYTHONPATH``):
the source is a version folder in the build context or a ``gs://`` URI. A version is complete when it has
``saved_model.pb`` and ``variables/variables.index``; when it carries ``tfloop.json`` its model name and
version must match the ones the image is labelled with. Exits 1 with a one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import storage

REQUIRED_FILES = ("saved_model.pb", "variables/variables.index")


def fetch(*, source: str, name: str, version: int, dest: str) -> str:
    """Copy ``source`` to ``<dest>/<name>/<version>`` and validate it; returns the target folder."""
    target = storage.join(dest, name, str(version))
    if not storage.exists(source):
        raise storage.TfloopError(
            f"model source {source} is empty or missing: put the version folder at model/ in the build "
            "context, or pass MODEL_URI=gs://<bucket>/<base>/<name>/<version>"
        )
    count = storage.copy_tree(source, target)
    files = set(storage.list_files(target))
    missing = [path for path in REQUIRED_FILES if path not in files]
    if missing:
        raise storage.TfloopError(
            f"model version from {source} is incomplete (missing {', '.join(missing)}); export it again "
            "with `tfloop export` and build from the finished version folder"
        )
    if "tfloop.json" in files:
        meta = json.loads(storage.read_text(storage.join(target, "tfloop.json")))
        found = (meta.get("model_name"), meta.get("version"))
        if found != (name, version):
            raise storage.TfloopError(
                f"{source} holds model {found[0]!r} version {found[1]!r}, but the image is built for "
                f"{name!r} version {version}: pass matching MODEL_NAME/MODEL_VERSION build arguments"
            )
    else:
        print(f"note: {source} has no tfloop.json (labels and run id stay unknown)", file=sys.stderr)
    print(f"model {name} v{version}: {count} files from {source} -> {target}", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="version folder (local path or gs:// URI)")
    parser.add_argument("--name", required=True, help="model name")
    parser.add_argument("--version", required=True, type=int, help="model version (integer)")
    parser.add_argument("--dest", default="/models", help="model base inside the image")
    args = parser.parse_args(argv)
    try:
        fetch(source=args.source, name=args.name, version=args.version, dest=args.dest)
    except storage.TfloopError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
