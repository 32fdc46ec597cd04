"""Serving image trim: the modules the serving stack imported keep only their bytecode.

Run in the builder after an import of the serving stack has written ``__pycache__/<module>.cpython-XY.pyc``
for every module it loaded. Each such module's source ``<module>.py`` is replaced by its bytecode at the
legacy location ``<module>.pyc``, which Python imports when no source is there (about 30 MB less in the
image; tracebacks from these modules name file and line without the source text). Modules that were not
imported keep their sources, so a lazy import at run time still works. Every ``__pycache__`` is removed.
Usage: python scripts/sourceless-imported.py SITE_PACKAGES
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def make_sourceless(site: Path) -> tuple[int, int]:
    """Replace imported modules' sources under ``site`` by their bytecode; (modules, bytes saved)."""
    tag = sys.implementation.cache_tag
    modules = saved = 0
    for cache in sorted(site.rglob("__pycache__"), reverse=True):
        for compiled in cache.glob(f"*.{tag}.pyc"):
            source = cache.parent / f"{compiled.name.removesuffix(f'.{tag}.pyc')}.py"
            if source.is_file():
                saved += source.stat().st_size
                compiled.replace(source.with_suffix(".pyc"))
                source.unlink()
                modules += 1
        shutil.rmtree(cache)
    return modules, saved


def main() -> int:
    site = Path(sys.argv[1])
    modules, saved = make_sourceless(site)
    print(f"sourceless: {modules} imported modules keep bytecode only ({saved / 1e6:.1f} MB of sources)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
