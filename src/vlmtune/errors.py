"""User-facing errors.

A `UserError` is something the user can fix (a config key, a data row, a model id). The CLI
prints it as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input, reported as one line: where, what is wrong, how to fix it."""

    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where = where
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        msg = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{msg} — {self.fix}" if self.fix else msg
