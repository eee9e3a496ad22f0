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

    def __reduce__(self):  # picklable (Ray, multiprocessing): Exception's default re-calls __init__ with the one-line message only
        return (_rebuild_user_error, (type(self), self.where, self.problem, self.fix, self.__dict__))

    def line(self) -> str:
        msg = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{msg} — {self.fix}" if self.fix else msg


def _rebuild_user_error(cls: type, where: str, problem: str, fix: str | None, state: dict) -> UserError:
    """Unpickle a `UserError` (or a subclass with extra attributes, e.g. an exit code)."""
    err = UserError.__new__(cls)
    UserError.__init__(err, where, problem, fix)
    err.__dict__.update(state)
    return err
