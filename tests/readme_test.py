"""The README's Python examples run as written, in order, in one namespace; its Evidence
section is the study's generated summary and quotes no number the report lacks."""

import functools
import json
import os
import re

import numpy as np

from experiments import result_tables as tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _readme() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)


def test_readme_python_examples_run():
  blocks = _python_blocks()
  assert len(blocks) >= 2, "the optax and NNX examples"
  namespace = {"__name__": "readme"}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  assert float(namespace["penalty"]) > 0  # the optax example's logged penalty
  assert np.isfinite(float(namespace["loss"]))  # the NNX example trained
  assert int(namespace["optimizer"].opt_state[0].count) == 3


def test_every_number_in_the_readme_evidence_section_is_in_a_generated_report():
  """The Evidence section quotes the study's report and nothing else: each decimal in it is
  in experiments/RESULTS_STUDY.md, and while the report holds no finished task the section
  says so and quotes no result."""
  section = re.search(r"^## Evidence.*?(?=^## )", _readme(), re.S | re.M).group(0)
  with open(os.path.join(ROOT, "experiments", "RESULTS_STUDY.md")) as f:
    report = f.read()
  numbers = set(re.findall(r"(?<![\w.])[+-]?\d+\.\d+", section))
  finished = re.findall(r"^## (\w+)$", report, re.M)
  if not finished:
    assert "no task has finished" in section.lower() and not numbers, sorted(numbers)
  else:
    assert len(numbers) >= 3 and all(t in section for t in finished)
  missing = sorted(n for n in numbers if n not in report and n.lstrip("+") not in report)
  assert not missing, f"README Evidence numbers the report does not hold: {missing}"


def test_the_readme_stays_a_landing_page_of_at_most_9000_characters():
  """Issue 30's cap: details live in the report and on the evidence page, so each finished
  task's row must be paid for by shorter prose, never by a longer README."""
  size = len(_readme())
  assert size <= 9000, f"README.md has {size} characters; move detail to docs/evidence.md"


def test_the_readme_summary_table_is_the_one_generated_from_the_report():
  readme = _readme()
  assert readme.count(tables.BEGIN) == 1 and readme.count(tables.END) == 1
  assert readme == tables.readme_with_summary(readme), (
    "README's study table is stale: run `python -m experiments.result_tables`."
  )


def _method(mean_ci, verdict=None, mdd=None, robust=True, detected=False):
  r = {"mean_ci": mean_ci}
  extra = {"verdict": verdict, "mdd": mdd, "robust": robust, "detected": detected}
  return r if verdict is None else {**r, **extra}


SUMMARY = {
  "tasks": {
    "task_a": {
      "subject": "nrs",
      "unit": "test accuracy, %",
      "head": ["method", "mean"],
      "rows": [["sgd", "70.00"], ["nrs", "72.10"]],
      "methods": {
        "sgd": _method("70.00 [69.00, 71.00]", "nrs ahead"),
        "sam": _method("72.00 [71.00, 73.00]", "tie", detected=True),
        "asam": _method("71.00 [70.00, 72.00]", "nrs ahead", robust=False),
        "nrs": _method("72.10 [71.10, 73.10]"),
        "saf": _method("74.00 [73.00, 75.00]", "nrs behind"),
        "mesa": _method("72.50 [70.00, 75.00]", "inconclusive", "2.10"),
      },
      "edges": [],
      "flatness": {"vs_base": "yes", "vs_sam": "no, sharper", "tau": -0.02, "tau_p": 0.8},
    },
    "task_b": {
      "subject": "nrs",
      "unit": "bits per character, lower is better",
      "head": ["method"],
      "rows": [["adamw"]],
      "methods": {
        "adamw": _method("2.50 [2.40, 2.60]", "nrs behind"),
        "nrs": _method("2.60 [2.50, 2.70]"),
      },
      "edges": ["adamw (weight_decay)", "nrs (nrs.radius)"],
      "flatness": {"vs_base": "not shown", "vs_sam": "not shown", "tau": 0.21, "tau_p": 0.1},
    },
  }
}


def test_the_summary_reads_each_verdict_from_the_json_and_adds_nothing(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text(json.dumps(SUMMARY))
  rows = tables.study_summary(str(path)).split("\n")[2:]
  assert rows == [
    "| `task_a` | nrs 72.10 [71.10, 73.10] % | sam (difference detected) | sgd, asam (fragile) | saf "
    "| mesa (MDD 2.10) | yes / no, sharper; tau -0.02 |",
    "| `task_b` | nrs 2.60 [2.50, 2.70] bits/char | none | none | adamw | none "
    "| not shown / not shown; tau +0.21 |",
    "",
    "Chosen values still at an edge of their grid after the extensions (the best may lie "
    "beyond): `task_b`: adamw (weight_decay), nrs (nrs.radius).",
  ]
  assert (
    tables.study_section("task_a", str(path))
    == "| method | mean |\n|---|---|\n| sgd | 70.00 |\n| nrs | 72.10 |"
  )
  assert tables.study_section("task_c", str(path)) is None
  assert "no task has finished" in tables.study_summary(str(tmp_path / "none.json")).lower()
  readme = f"intro\n{tables.BEGIN}\nold table\n{tables.END}\nrest\n"
  new = tables.readme_with_summary(readme, str(path))
  assert new.startswith(f"intro\n{tables.BEGIN}\n| task |") and new.endswith(
    f"{tables.END}\nrest\n"
  )
  assert "old table" not in new and tables.readme_with_summary(new, str(path)) == new


def test_the_install_line_names_extras_that_exist_and_no_doc_names_an_unpublished_package():
  """The README's line for one's own environment installs from a clone with real extras;
  no page tells a user to `pip install nrs-jax`, a name no index publishes."""
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = set(tomllib.load(f)["project"]["optional-dependencies"])
  lines = re.findall(r'pip install (?:-e )?"\.\[([a-z,]+)\]"', _readme())
  assert lines, 'the README shows pip install ".[extras]" from a clone'
  for names in lines:
    assert set(names.split(",")) <= extras, (names, extras)
  pages = [os.path.join(ROOT, "README.md")]
  for top in ("docs", "nrs_jax", "experiments"):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      pages += [os.path.join(folder, n) for n in files if n.endswith((".md", ".py"))]
  for page in pages:
    with open(page, encoding="utf-8") as f:
      assert not re.search(r"pip install ['\"]?nrs[-_]jax", f.read()), page


def _prose_decimals(path: str, skip_section: str | None = None) -> set[str]:
  """The decimals a page's prose states (code cells excluded; one section left out)."""
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    text = f.read()
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  if skip_section:
    text = re.sub(rf"^### {skip_section}.*?(?=^### )", "", text, flags=re.S | re.M)
  return set(re.findall(r"(?<![\w.])[+-]?\d+\.\d+(?![\d.])", text))


def test_every_number_on_the_evidence_page_and_in_the_tutorials_is_in_the_report():
  """As the README's: the evidence page (but its reproducibility section, which quotes the ISA
  check, tested in study_runner_test) and the settings and unlabeled tutorials quote the
  study's generated report, never a number typed by hand."""
  with open(os.path.join(ROOT, "experiments", "RESULTS_STUDY.md")) as f:
    report = f.read()
  pages = {
    "docs/evidence.md": "Reproducibility",
    "docs/tutorials/settings.md": None,
    "docs/tutorials/unlabeled.md": None,
  }
  for page, skip in pages.items():
    loose = sorted(n for n in _prose_decimals(page, skip) if n.lstrip("+") not in report)
    assert not loose, f"{page} quotes numbers the report lacks: {loose}"
