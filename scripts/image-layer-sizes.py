"""Measure the uncompressed size of each layer group of a built serving image; update BENCHMARKS.md.

Usage (the image must be in buildah's store; storage options as used for the build):
  .venv/bin/python scripts/image-layer-sizes.py IMAGE_REF [--storage-driver D --root DIR --runroot DIR]
      [--write BENCHMARKS.md]
The numbers come from ``buildah push IMAGE oci:DIR``: each layer blob measured as stored and decompressed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from export.image import ImageSpec, buildah_global_options


@dataclass(frozen=True)
class LayerSize:
    """One layer of an image: the instruction that made it, its uncompressed and compressed (push) size."""

    created_by: str
    size_bytes: int
    compressed_bytes: int


def _uncompressed_size(blob: Path, media_type: str) -> int:
    if not media_type.endswith(("gzip", "tar.gzip")) and not media_type.endswith("+gzip"):
        return blob.stat().st_size
    total = 0
    with gzip.open(blob, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            total += len(chunk)
    return total


def buildah_layer_sizes(spec: ImageSpec, ref: str) -> list[LayerSize]:
    """Uncompressed and compressed size of each layer of an image in buildah's store, base first.

    The image is written once to a temporary OCI layout (``buildah push REF oci:DIR``); each layer blob is
    measured as stored (compressed) and decompressed, and paired with the non-empty history entries.
    """
    with tempfile.TemporaryDirectory(prefix="tfloop-layers-") as scratch:
        layout = Path(scratch) / "image"
        subprocess.run(
            ["buildah", *buildah_global_options(spec), "push", "--quiet", ref, f"oci:{layout}"],
            check=True,
            capture_output=True,
        )
        blobs = layout / "blobs" / "sha256"
        index = json.loads((layout / "index.json").read_text())
        manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":", 1)[1]).read_text())
        config = json.loads((blobs / manifest["config"]["digest"].split(":", 1)[1]).read_text())
        layers = [
            (
                _uncompressed_size(blobs / layer["digest"].split(":", 1)[1], layer.get("mediaType", "")),
                int(layer["size"]),
            )
            for layer in manifest["layers"]
        ]
    history = [entry for entry in config.get("history", []) if not entry.get("empty_layer")]
    if len(history) != len(layers):
        history = [{"created_by": "?"}] * len(layers)
    return [
        LayerSize(created_by=str(entry.get("created_by", "")), size_bytes=size, compressed_bytes=compressed)
        for entry, (size, compressed) in zip(history, layers, strict=True)
    ]


SECTION = "image-layers"
GROUPS = (
    ("useradd", "non-root user and state folders"),
    ("/opt/venv", "serving virtual environment (/opt/venv)"),
    ("/app/storage", "storage/ package"),
    ("/app/serving", "serving/ package"),
    ("/models", "model version (/models/<name>/<version>)"),
)


def group_of(layer: LayerSize, index: int, base_layers: int) -> str:
    if index < base_layers:
        return "base image (Debian bookworm + python3)"
    for marker, label in GROUPS:
        if marker in layer.created_by:
            return label
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--storage-driver")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--runroot", type=Path)
    parser.add_argument("--base-layers", type=int, default=1, help="layers that belong to the base image")
    parser.add_argument("--write", type=Path, help="replace this script's section in that file")
    args = parser.parse_args()
    spec = ImageSpec(
        model_base="-",
        model_name="-",
        storage_driver=args.storage_driver,
        storage_root=args.root,
        storage_runroot=args.runroot,
    )
    layers = buildah_layer_sizes(spec, args.image)
    totals: dict[str, tuple[int, int]] = {}
    for index, layer in enumerate(layers):
        name = group_of(layer, index, args.base_layers)
        size, compressed = totals.get(name, (0, 0))
        totals[name] = (size + layer.size_bytes, compressed + layer.compressed_bytes)
    total = sum(size for size, _ in totals.values())
    total_compressed = sum(compressed for _, compressed in totals.values())
    command = " ".join(
        shlex.quote(a) for a in [".venv/bin/python", "scripts/image-layer-sizes.py", *sys.argv[1:]]
    )
    lines = [
        f"<!-- BEGIN {SECTION} -->",
        "## Serving image layer sizes (Dockerfile.serve, uncompressed)",
        "",
        f"Image `{args.image}`, measured with `{command}`",
        "(`buildah push` to an OCI layout; each layer blob measured decompressed and as pushed, gzip).",
        "1 MB = 10^6 bytes.",
        "",
        "| layer group | uncompressed MB | compressed MB |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {size / 1e6:.1f} | {packed / 1e6:.1f} |" for name, (size, packed) in totals.items()),
        f"| **total** | **{total / 1e6:.1f}** | **{total_compressed / 1e6:.1f}** |",
        "",
        "Target: at most 1000 MB uncompressed.",
        f"<!-- END {SECTION} -->",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        current = args.write.read_text() if args.write.exists() else "# Benchmarks\n"
        begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
        if begin in current and end in current:
            head, rest = current.split(begin, 1)
            current = head + text + rest.split(end, 1)[1]
        else:
            current = current.rstrip("\n") + "\n\n" + text + "\n"
        args.write.write_text(current)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
