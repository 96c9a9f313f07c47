"""Fixed-width plain-text tables from a list of dicts, for every command that prints results.

No dependencies. Text is left-aligned, numbers right-aligned; ``None`` and NaN print as ``-``;
a list or tuple of ints prints as a shape (``576x1536``).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MISSING = "-"
SIGNIFICANT_DIGITS = 4


@dataclass(frozen=True)
class Column:
    """One column: the dict key, its header (the key by default) and an optional format.

    ``fmt`` is a format spec (``".2f"``) or a function from the value to its text."""

    key: str
    header: str | None = None
    fmt: str | Callable[[object], str] | None = None


def format_number(x: float, digits: int = SIGNIFICANT_DIGITS) -> str:
    """``digits`` significant digits in fixed notation; scientific below 1e-3 or from 1e7."""
    if math.isnan(x):
        return MISSING
    if math.isinf(x) or x == 0:
        return str(x) if math.isinf(x) else "0"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude < -3 or magnitude >= 7:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{max(0, digits - 1 - magnitude)}f}"


def format_cell(value: object, fmt: str | Callable[[object], str] | None = None) -> str:
    """The text of one cell (see the module docstring for the defaults)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if callable(fmt):
        return fmt(value)
    if fmt is not None:
        return format(value, fmt)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return "x".join(str(v) for v in value)
    return str(value)


def _is_numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(
    rows: Sequence[dict],
    columns: Sequence[str | Column] | None = None,
    title: str | None = None,
) -> str:
    """Render ``rows`` as a fixed-width table; ``columns`` defaults to the keys of the first row.

    A column is right-aligned when every non-missing value in it is a number."""
    if columns is None:
        columns = list(rows[0]) if rows else []
    columns = [c if isinstance(c, Column) else Column(c) for c in columns]
    headers = [c.header if c.header is not None else c.key for c in columns]
    cells = [[format_cell(row.get(c.key), c.fmt) for c in columns] for row in rows]
    right = [
        all(_is_numeric(row.get(c.key)) or row.get(c.key) is None for row in rows)
        for c in columns
    ]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def render(parts: Sequence[str]) -> str:
        aligned = [p.rjust(w) if r else p.ljust(w) for p, w, r in zip(parts, widths, right)]
        return "  ".join(aligned).rstrip()

    lines = [title] if title else []
    lines.append(render(headers))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)
