"""Shared terminal output: one rich console (stderr for progress, stdout for results), progress bars, JSON."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

LOG_WIDTH = 160  # piped output (CI logs, `| tee`): rich's 80 columns would cut the result tables' cells


def _width(stream: object) -> int | None:
    """A terminal's own width; for a pipe or file, LOG_WIDTH unless the user set COLUMNS (rich reads it)."""
    isatty = getattr(stream, "isatty", None)
    if os.environ.get("COLUMNS") or (isatty is not None and isatty()):
        return None
    return LOG_WIDTH


out = Console(width=_width(sys.stdout))  # results: tables, summaries
err = Console(stderr=True, width=_width(sys.stderr))  # progress, warnings: `--json` stdout stays clean


def progress(transient: bool = False) -> Progress:
    """A progress bar for long work (calibration, builds, profiling); draws on stderr."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=transient,
        disable=not err.is_terminal,
    )


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def emit_json(payload: Any) -> None:
    """Print ``payload`` as JSON on stdout (numpy scalars and paths are converted)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
