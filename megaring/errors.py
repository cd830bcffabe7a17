"""How megaring reports bad input: one message listing every problem, so one fix-up does it all."""

from __future__ import annotations

from collections.abc import Iterable
from difflib import SequenceMatcher


def problem_list(title: str, problems: list[str]) -> str:
    """``title:`` followed by one ``  - problem`` line each."""
    return f"{title}:\n  - " + "\n  - ".join(problems)


class BadInput(ValueError):
    """Input the user must fix (a config value, a checkpoint or data file): the commands print the
    message without a traceback and exit with status 2. Derive an input error from it so that every
    command and the local spawner report it that way."""


class ConfigError(BadInput):
    """A training config that cannot run; the message lists every problem (exit status 2)."""

    @classmethod
    def listing(cls, problems: list[str]) -> ConfigError:
        return cls(problem_list(f"invalid training config ({len(problems)} problem{'s' * (len(problems) > 1)})",
                                problems))


def closest_name(name: str, known: Iterable[str]) -> str:
    """The known dotted name a user most likely meant by ``name`` (for "did you mean ...?").

    Ranked by the last dotted part: the same part (``seq_len`` -> ``trainer.seq_len``), then an
    abbreviation either way (``learning_rate`` -> ``lr``, ``sequence_length`` -> ``seq_len``), then
    spelling (``devicez`` -> ``devices``); a name in the same section wins a tie.
    """
    leaf, section = name.rsplit(".", 1)[-1], name.rpartition(".")[0]

    def score(candidate: str) -> float:
        their_leaf, their_section = candidate.rsplit(".", 1)[-1], candidate.rpartition(".")[0]
        return (3.0 * (leaf == their_leaf) + 2.0 * (_abbreviates(leaf, their_leaf) or _abbreviates(their_leaf, leaf))
                + SequenceMatcher(None, leaf, their_leaf).ratio() + 0.3 * (section == their_section))

    return max(known, key=score)


def _abbreviates(short: str, long: str) -> bool:
    """``short`` is the initials of ``long``'s words, or each of its words begins the matching one."""
    words, long_words = short.split("_"), long.split("_")
    if short == "".join(w[:1] for w in long_words) and len(long_words) > 1:
        return True
    return (short != long and len(words) == len(long_words)
            and all(w and lw.startswith(w) for w, lw in zip(words, long_words, strict=True)))
