"""User-facing errors: one line naming the problem and the fix, exit code 2."""

from __future__ import annotations


class TrtbuildError(Exception):
    """A problem with the user's input or environment, not a bug.

    The CLI prints ``error: <problem> <fix>`` on one line and exits with code 2, no traceback.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem + "."
        if self.fix:
            text += " " + self.fix.rstrip(".") + "."
        return " ".join(text.split())


class TensorRTUnavailable(TrtbuildError):
    """TensorRT (the real libraries, not the type stubs) cannot be imported here."""
