"""Command-line keys outside a command's schema are errors, each naming the closest known key.

A typo (``outptu=...``, ``+tokenizer.vocab_sise=...``) must never run with the defaults: every
``key=value`` a command is given, with or without Hydra's ``+`` / ``++``, is checked against the
command's dataclass schema before anything runs (exit status 2 from the command).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable

HYDRA_PREFIXES = ("hydra.", "hydra/")  # Hydra's own settings: Hydra checks them


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """The dotted key of every field of the dataclass ``schema``, nested dataclasses included."""
    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(schema_keys(hints[f.name], f"{prefix}{f.name}."))
    return keys


def override_keys(args: Iterable[str]) -> list[str]:
    """The keys of command-line overrides (``key=value``, ``+key=value``, ``++key=value``, ``~key``);
    flags (``--cfg job``, ``-m``) and Hydra's own ``hydra.*`` keys are left out."""
    keys = []
    for arg in args:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        key = arg.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if not key.startswith(HYDRA_PREFIXES) and key != "hydra":
            keys.append(key)
    return keys


def unknown_key_problems(keys: Iterable[str], schema: type) -> list[str]:
    """One line per key that is not in ``schema``, naming the closest known key (or all of them)."""
    known = schema_keys(schema)
    problems = []
    for key in keys:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
        problems.append(f"unknown key {key!r} ({hint})")
    return problems
