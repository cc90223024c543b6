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
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = re.search(r"^## Evidence.*?(?=^## )", readme, re.S | re.M).group(0)
  reports = ""
  for name in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
    if name.startswith("RESULTS") and name.endswith(".md"):
      with open(os.path.join(ROOT, "experiments", name)) as f:
        reports += f.read()
  numbers = set(re.findall(r"(?<![\w.])[+-]?\d+\.\d+", section))
  assert len(numbers) >= 10  # the section quotes the reports (the check is not vacuous)
  missing = sorted(n for n in numbers if n not in reports and n.lstrip("+") not in reports)
  assert not missing, f"README Evidence numbers no experiments/RESULTS*.md holds: {missing}"
