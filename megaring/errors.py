"""How megaring reports bad input: one message listing every problem, so one fix-up does it all."""

from __future__ import annotations


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
