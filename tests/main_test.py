"""``python -m experiments.main --list`` names every config (with its launch command) and method."""

import os
import subprocess
import sys

from experiments import steps  # (not experiments.main: its absl flags clash with study's)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*flags):
  cmd = [sys.executable, "-m", "experiments.main", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_list_names_every_config_and_method_with_hyperparameters():
  out = _main("--list")
  assert out.returncode == 0, out.stderr[-2000:]
  text = out.stdout
  configs = sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "configs")) if f[0] != "_"
  )
  for name in configs:
    assert f"\n{name}:\n" in "\n" + text, name
    assert f"experiments/configs/{name}.py" in text, f"{name}'s docstring has no launch command"
  for name in steps.METHODS:
    assert f"  {name} " in text
  # Each method's options under the config section it reads (an explicit table, not its
  # name's prefix): nrs_unlabeled reads config.nrs.
  row = next(line for line in text.splitlines() if line.startswith("  nrs_unlabeled "))
  assert "nrs.alpha=1.0, nrs.radius=0.05" in row
  assert "vat.eps=1.0" in next(line for line in text.splitlines() if line.startswith("  vat "))
  # The demo's docstring states what it is: one seed, about a minute.
  assert "One seed per method" in text and "about one minute" in text


def test_missing_config_is_a_usage_error_naming_list():
  out = _main()
  assert out.returncode != 0 and "--list" in out.stderr


def test_help_exits_zero_and_names_the_flags():
  out = _main("--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--workdir" in out.stdout and "--list" in out.stdout and "--config" in out.stdout
