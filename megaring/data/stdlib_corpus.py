"""The embedded default corpus: the running interpreter's standard library as "repositories".

Every machine with Python has it, so the demo needs no download. Each top-level package
(``asyncio``, ``email``, ...) becomes one long document, its ``.py`` files concatenated in
path order under a ``# ---- file: <path> ----`` header; the top-level modules together form
the first and largest document (about 1.4M tokens with an 8K vocabulary). Test suites are
left out. ``max_bytes`` keeps whole files until the budget is spent, so a budget gives a
prefix of the same corpus on every machine with the same Python.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megaring.data.sources import Record

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TOPLEVEL = "_toplevel"


@dataclass(frozen=True)
class StdlibRepository:
    """One document: a group of standard-library files under one name."""

    name: str
    root: Path
    files: tuple[Path, ...]

    def records(self) -> Iterator[Record]:
        yield Record(self.text().encode("utf-8"), "text", f"stdlib:{self.name}")

    def text(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        parts = [f"# ==== repository: {self.name} (Python {version} standard library) ====\n"]
        for path in self.files:
            rel = path.relative_to(self.root).as_posix()
            parts.append(f"# ---- file: {rel} ----\n")
            parts.append(path.read_bytes().decode("utf-8", errors="replace"))
            parts.append("\n")
        return "".join(parts)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(max_bytes: int = 0, root: Path | None = None) -> list[StdlibRepository]:
    """The standard library as repositories; with ``max_bytes > 0`` only whole files up to that budget."""
    root = root or stdlib_root()
    groups: dict[str, list[Path]] = {}
    for path in _python_files(root):
        rel = path.relative_to(root)
        name = TOPLEVEL if len(rel.parts) == 1 else rel.parts[0]
        if name.isidentifier() and not name.startswith("__"):  # skips build dirs and __phello__
            groups.setdefault(name, []).append(path)
    repos, budget = [], max_bytes if max_bytes > 0 else float("inf")
    for name in sorted(groups, key=lambda n: (n != TOPLEVEL, n)):
        kept = []
        for path in groups[name]:
            size = path.stat().st_size
            if size > budget:
                break
            kept.append(path)
            budget -= size
        if kept:
            repos.append(StdlibRepository(name, root, tuple(kept)))
        if len(kept) < len(groups[name]):
            break
    return repos


def _python_files(root: Path) -> list[Path]:
    """Every ``.py`` file below ``root`` outside tests and installed packages, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(p for p in out if p.is_file())
