"""Result tables stay readable when the CLI's output is piped (CI logs, `| tee`): rich's default 80 columns
cut an 11-column fidelity table's cells to "83.…"."""

from __future__ import annotations

import io

import pytest
from rich.table import Table

from trtbuild.core import console


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_output_is_wide_unless_columns_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert console._width(io.StringIO()) == console.LOG_WIDTH
    assert console._width(_Tty()) is None  # a terminal keeps its own width
    monkeypatch.setenv("COLUMNS", "100")
    assert console._width(io.StringIO()) is None  # the user's COLUMNS wins (rich reads it)


def test_a_piped_fidelity_sized_table_keeps_every_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    from rich.console import Console

    row = ["logits", "classification", "top1>=99.00%", "86.67% [70.3%, 94.7%]", "87.50% (2)", "0.0130"]
    row += ["0.99632 [0.9954, 0.9972]", "0.99081", "21.2", "5.37%", "pass"]
    table = Table(*[f"col{i}" for i in range(len(row))])
    table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=console._width(buffer)).print(table)
    text = buffer.getvalue()
    assert all(cell in text for cell in row) and "…" not in text, text
