"""The code's shape (issue 50: it replaces the harness's old line cap): ruff owns the layout,
no function runs over 120 lines, train.py stays within 400 lines and the library core
(nrs_jax/ without flatness/ and integrations/) within 1,700 (1,500 before issue 52)."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(*folders):
  out = []
  for folder in folders:
    out += glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
  return sorted(out)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_no_function_runs_over_120_lines():
  long = []
  for path in _sources("nrs_jax", "experiments", "docs"):
    for node in ast.walk(ast.parse(_read(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if node.end_lineno - node.lineno + 1 > 120:
          long.append((os.path.relpath(path, ROOT), node.name))
  assert not long, long


def test_line_budgets_of_train_and_the_library_core():
  assert _read(os.path.join(ROOT, "experiments", "train.py")).count("\n") <= 400
  core = [p for p in glob.glob(os.path.join(ROOT, "nrs_jax", "*.py"))]
  # 1,500 when issue 50 set it (the core had reached it); issue 52 added a feature, the
  # penalty gradient reused between steps with its host-side schedule, and the Rademacher
  # draw (about 150 lines with their docs), so the budget grew by them rather than the
  # rest being squeezed (the line cap this replaced is what squeezing led to).
  assert sum(_read(p).count("\n") for p in core) <= 1700


def test_ruff_owns_the_layout():
  """No formatter escape (a line squeezed past ruff) anywhere in the tree's Python."""
  marker = "fmt: " + "skip"
  found = [p for p in _sources("nrs_jax", "experiments", "docs", "tests") if marker in _read(p)]
  assert not found, found
