"""How megaring reports bad input: one message listing every problem, so one fix-up does it all."""

from __future__ import annotations


def problem_list(title: str, problems: list[str]) -> str:
    """``title:`` followed by one ``  - problem`` line each."""
    return f"{title}:\n  - " + "\n  - ".join(problems)
