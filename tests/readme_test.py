"""The README's Python examples run as written, in order, in one namespace."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
  with open(os.path.join(ROOT, "README.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


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
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = re.search(r"^## Evidence.*?(?=^## )", readme, re.S | re.M).group(0)
  with open(os.path.join(ROOT, "experiments", "RESULTS_STUDY.md")) as f:
    report = f.read()
  numbers = set(re.findall(r"(?<![\w.])[+-]?\d+\.\d+", section))
  finished = re.findall(r"^## (\w+)$", report, re.M)
  if not finished:
    assert "no task has finished" in section and not numbers, sorted(numbers)
  else:
    assert len(numbers) >= 3 and all(t in section for t in finished)
  missing = sorted(n for n in numbers if n not in report and n.lstrip("+") not in report)
  assert not missing, f"README Evidence numbers the report does not hold: {missing}"
