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
