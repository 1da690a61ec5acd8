"""Library code reports through ``logging`` (loggers under trtbuild, calibrators and export); the CLI and the
demo show those records as ``warning: ...`` lines on stderr. A user of the Python API configures logging as
for any library; nothing is printed behind their back."""

from __future__ import annotations

import logging

from trtbuild.core import console

LOGGER_ROOTS = ("trtbuild", "calibrators", "export")


class _ConsoleHandler(logging.Handler):
    """Warnings as the CLI's one-line ``warning:`` messages (stderr, so --json stdout stays clean)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break the command that logged it
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            console.warn(message)
        else:
            console.err.print(message, highlight=False)


def show_on_console(level: int = logging.WARNING) -> None:
    """Route the library's records at ``level`` and above to the console (idempotent)."""
    for root in LOGGER_ROOTS:
        logger = logging.getLogger(root)
        logger.setLevel(min(level, logger.level or level))
        if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
            handler = _ConsoleHandler(level)
            logger.addHandler(handler)
