"""The call signatures docs/architecture.md shows are the code's: names, order, keyword-only markers.

Each ``## ... (`megaring.x`)`` heading names the module its section speaks of; a code span that
reads ``name(params)`` and resolves to a callable there (or in ``megaring``) is compared with
``inspect.signature``: every parameter the doc names exists, in the doc's order, keyword-only exactly
where the doc puts a ``*``; a parameter the doc leaves out is a mismatch unless the doc writes
``...`` (more optional parameters) or ``**``. Spans on instances (``reader.micro_batches(step)``) are not signatures.
"""

from __future__ import annotations

import importlib
import inspect
import re

from tests.helpers.cli import ROOT

DOC = ROOT / "docs" / "architecture.md"
SPAN = re.compile(r"`([A-Za-z_][\w.]*)\(([^`()]*(?:\([^`()]*\)[^`()]*)*)\)(?: -> [^`]*)?`")
HEADING = re.compile(r"^##+ .*\(`(megaring[\w.]*)`\)", re.M)
# Signatures the page must show (and this test must have checked): the contracts a newcomer calls first.
MUST_CHECK = {"ring_attention", "build_batch_reader", "build_model", "shard_ranges", "ParallelDims",
              "init_distributed", "validate", "validate_model_config", "vocab_parallel_cross_entropy"}


def split_params(text: str) -> list[str]:
    """Top-level comma-separated items of a parameter list (brackets nest)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [i for i in [*items, cur.strip()] if i]


def section_module(name: str) -> str:
    """The module a heading names; a heading may name a function (``megaring.ring_attention``): its package."""
    try:
        importlib.import_module(name)
        return name
    except ModuleNotFoundError:
        return name.rsplit(".", 1)[0]


def resolve(name: str, module: str):
    for base in (module, "megaring"):
        obj = importlib.import_module(base)
        for part in name.split("."):
            obj = attribute(obj, part)
        if callable(obj):
            return obj
    return None


def attribute(obj, part: str):
    """``obj.part``, importing a submodule of a package; None when there is none."""
    if obj is None:
        return None
    if hasattr(obj, part):
        return getattr(obj, part)
    if inspect.ismodule(obj):
        try:
            return importlib.import_module(f"{obj.__name__}.{part}")
        except ModuleNotFoundError:
            return None
    return None


def mismatch(name: str, shown: str, obj) -> str | None:
    sig = inspect.signature(obj)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    kw_only, order, open_ended = False, [], False
    for item in split_params(shown):
        if item == "*":
            kw_only = True
            continue
        if item.startswith("**") or item == "...":
            open_ended = True
            continue
        pname = item.split("=", 1)[0].split(":", 1)[0].strip().lstrip("*")
        real = params.get(pname)
        if real is None:
            return f"{name}: the doc shows {pname!r}, the code has {list(params)}"
        if (real.kind is inspect.Parameter.KEYWORD_ONLY) != kw_only and real.kind is not inspect.Parameter.VAR_KEYWORD:
            return f"{name}: {pname!r} is {'not ' if kw_only else ''}keyword-only in the code"
        order.append(pname)
    real_order = [n for n in params if n in order]
    if real_order != order:
        return f"{name}: the doc's order {order}, the code's {real_order}"
    missing = [n for n, p in params.items() if n not in order
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    required = [n for n in missing if params[n].default is inspect.Parameter.empty]
    if required or (missing and not open_ended):
        return f"{name}: the doc leaves out {missing} (write '...' for optional ones)"
    return None


def test_architecture_signatures_match_the_code():
    text = DOC.read_text()
    marks = [(m.start(), section_module(m.group(1))) for m in HEADING.finditer(text)]
    checked, problems = set(), []
    for m in SPAN.finditer(text):
        module = next((mod for pos, mod in reversed(marks) if pos < m.start()), "megaring")
        name, shown = m.group(1), m.group(2)
        obj = resolve(name, module)
        if obj is None:
            continue
        checked.add(name.rsplit(".", 1)[-1])
        if (problem := mismatch(name, shown, obj)) is not None:
            problems.append(problem)
    assert not problems, "docs/architecture.md is stale:\n" + "\n".join(problems)
    assert MUST_CHECK <= checked, f"docs/architecture.md no longer shows {sorted(MUST_CHECK - checked)}"
