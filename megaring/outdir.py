"""Writing a directory the user named without ever losing a file the command did not write.

The rule, for every megaring command that writes a directory (``megaring-export``,
``megaring-preprocess``, the tools):

1. The output is neither an input, nor inside an input directory, nor a directory that holds an
   input (an input's parent).
2. An existing output is replaced only when it is recognisably the command's own earlier output
   (:class:`OwnOutput`: its marker files are there and nothing else is), and only with
   ``overwrite=true``. An empty directory counts as absent. Anything else is refused, naming a
   few of the entries the command did not write, and nothing is deleted.
3. Everything is written into a temporary sibling ``.<name>.tmp-<pid>`` and renamed into place
   once complete (an old own output is moved aside first, then removed), so an interrupted run
   never leaves a directory that looks complete; the temporary is removed on any error, on
   SIGINT (Ctrl-C) and on SIGTERM (which then ends the process with status 143).

Use::

    problems = output_problems(output, STORE, inputs=paths, overwrite=cfg.overwrite)  # with the others
    with writing(output, STORE, inputs=paths, overwrite=cfg.overwrite) as tmp:
        ...  # write the files into tmp
    # output is complete here

:func:`clear_own` is the same rule for a command that must empty a directory it writes in place.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from megaring.errors import problem_list

SHOWN_ENTRIES = 5  # foreign entries named in a refusal


class OutputError(ValueError):
    """The output directory cannot be written without losing files; the message says what to change."""


@dataclass(frozen=True)
class OwnOutput:
    """What a command's earlier output looks like.

    ``markers``: name patterns that each match at least one entry; ``entries``: name patterns
    (``fnmatch``) covering every entry the command writes. A directory with all markers and
    nothing outside ``entries`` is the command's own.
    """

    what: str  # e.g. "a megaring token store"
    markers: tuple[str, ...]
    entries: tuple[str, ...]

    def foreign(self, directory: Path) -> list[str]:
        """Entries of ``directory`` the command does not write, sorted."""
        return sorted(p.name for p in directory.iterdir()
                      if not any(fnmatch.fnmatchcase(p.name, pat) for pat in self.entries))

    def missing_markers(self, directory: Path) -> list[str]:
        names = [p.name for p in directory.iterdir()]
        return [m for m in self.markers if not fnmatch.filter(names, m)]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_ENTRIES])
    return shown + (f" and {len(names) - SHOWN_ENTRIES} more" if len(names) > SHOWN_ENTRIES else "")


def input_problems(output: Path, inputs: Iterable[str | Path]) -> list[str]:
    """The output is an input, holds one, or lies inside an input directory."""
    out = output.resolve()
    problems, seen = [], set()
    for given in inputs:
        path = Path(given).resolve()
        if path in seen:
            continue
        seen.add(path)
        if out == path or out in path.parents:
            problems.append(f"output={output} holds input {given}: replacing it would delete the input; "
                            "write the output to a new directory elsewhere")
        elif path in out.parents:
            problems.append(f"output={output} is inside input {given}: write the output outside it")
    return problems


def existing_problems(output: Path, own: OwnOutput, overwrite: bool) -> list[str]:
    """An existing ``output`` that may not be replaced (see the module docstring)."""
    if not output.exists() and not output.is_symlink():
        return []
    if not output.is_dir() or output.is_symlink():
        return [f"output={output} exists and is not a directory: name a new directory"]
    entries = sorted(p.name for p in output.iterdir())
    if not entries:
        return []
    foreign, missing = own.foreign(output), own.missing_markers(output)
    if foreign or missing:
        why = f"it holds {_listing(foreign)}" if foreign else f"it has no {', '.join(missing)}"
        return [f"output={output} is not empty and is not {own.what} ({why}): nothing was deleted; name a new "
                f"or empty directory (only {own.what} is ever replaced, with overwrite=true)"]
    if not overwrite:
        return [f"output={output} already exists and holds {own.what} ({_listing(entries)}): pass "
                "overwrite=true to replace it, or name a new directory"]
    return []


def output_problems(output: str | Path, own: OwnOutput, *, inputs: Iterable[str | Path] = (),
                    overwrite: bool = False) -> list[str]:
    """Every reason ``output`` cannot be written now, as readable lines (empty when it can)."""
    output = Path(output)
    return input_problems(output, inputs) + existing_problems(output, own, overwrite)


def temporary_path(output: Path) -> Path:
    """The temporary sibling a command writes ``output`` into."""
    return output.parent / f".{output.name}.tmp-{os.getpid()}"


@contextmanager
def writing(output: str | Path, own: OwnOutput, *, inputs: Iterable[str | Path] = (),
            overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on a normal exit it becomes ``output`` (module docstring).

    Raises :class:`OutputError` before anything is written when the rule refuses ``output``.
    """
    output, inputs = Path(output), list(inputs)
    problems = output_problems(output, own, inputs=inputs, overwrite=overwrite)
    if problems:
        raise OutputError(problem_list("cannot write the output", problems))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(output)
    if tmp.exists():  # left by a killed process that had our pid (pids restart low in containers)
        shutil.rmtree(tmp)
    tmp.mkdir()
    committed = False  # a signal deferred during the renames arrives after them: the output is complete
    try:
        with _sigterm_raises():
            yield tmp
            with _signals_deferred():
                _commit(tmp, output, own, inputs, overwrite)
                committed = True
    except BaseException as err:
        if not committed:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, (KeyboardInterrupt, Terminated)):
                print(f"interrupted: removed the unfinished {tmp}; {output} is unchanged", file=sys.stderr)
        raise


def _commit(tmp: Path, output: Path, own: OwnOutput, inputs: list, overwrite: bool) -> None:
    """``tmp`` becomes ``output``; an old own output is moved aside, then removed."""
    problems = output_problems(output, own, inputs=inputs, overwrite=overwrite)  # it may have changed meanwhile
    if problems:
        raise OutputError(problem_list("cannot write the output", problems))
    old = None
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    elif output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old)


def clear_own(directory: str | Path, own: OwnOutput) -> None:
    """Remove ``directory`` if it is ``own``'s earlier output (or empty); refuse anything else.

    For a command that writes a directory in place (e.g. ``megaring-verify``'s runs).
    """
    directory = Path(directory)
    problems = existing_problems(directory, own, overwrite=True)
    if problems:
        raise OutputError(problem_list("cannot write the output", problems))
    if directory.exists():
        shutil.rmtree(directory)


class Terminated(SystemExit):
    """SIGTERM arrived while an output was being written (exit status 128 + 15, as the signal's)."""


def _on_sigterm(signum, frame):
    raise Terminated(128 + signum)


def _default_sigterm_in_child() -> None:
    """A process forked while an output is written (an encoding worker) keeps SIGTERM's default
    action: a handler that must run Python code cannot stop a worker blocked in C, and the pool
    that terminates it would wait for it forever."""
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` here, so the temporary is removed as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the renames are done (an output is never half replaced)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
