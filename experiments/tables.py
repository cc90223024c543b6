"""The one markdown-table helper of the harness (reports, benchmarks, the demo); the
documentation renders its tables with it (``experiments/result_tables.py``)."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  """The one markdown-table helper of the harness (reports, benchmarks, the demo)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines)
