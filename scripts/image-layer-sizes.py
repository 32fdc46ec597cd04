"""Measure the uncompressed size of each layer group of a built serving image; update BENCHMARKS.md.

Usage (the image must be in buildah's store; storage options as used for the build):
  .venv/bin/python scripts/image-layer-sizes.py IMAGE_REF [--storage-driver D --root DIR --runroot DIR]
      [--write BENCHMARKS.md]
The numbers come from ``buildah push IMAGE oci:DIR`` (export.image.buildah_layer_sizes).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from export.image import ImageSpec, LayerSize, buildah_layer_sizes

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
