"""`make test-compat`: the library's tests at the declared floors and at the newest releases.

  python .ci/compat.py min   # Python and every floor that pyproject.toml declares, pinned
  python .ci/compat.py new   # the newest jax, optax, flax, equinox, chex on Python 3.13

Each venv (.venv-compat/<mode>) gets the pins below, nrs_jax installed without its
dependencies, and runs COMPAT_TESTS: the tests that need only nrs_jax, optax, flax,
equinox, chex and scipy (no TensorFlow, TFDS or harness). The versions it resolved are
printed and written to .venv-compat/<mode>/versions.txt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPAT_TESTS = [
  "nrs_jax",
  "tests/divergence_test.py",
  "tests/equinox_test.py",
  "tests/flatness_test.py",
  "tests/integrations_test.py",
  "tests/models_test.py",
  "tests/neighbors_test.py",
  "tests/optax_common_test.py",
  "tests/options_test.py",
  "tests/penalty_test.py",
  "tests/reach_test.py",
  "tests/reuse_test.py",
  "tests/strategies_test.py",
  "tests/transform_test.py",
]
PACKAGES = ("jax", "jaxlib", "optax", "flax", "equinox", "chex")
TOOLS = ["scipy", "pytest", "pytest-xdist"]
NEWEST_PYTHON = "3.13"


def floors() -> tuple[str, dict[str, str]]:
  """``requires-python``'s minimum and each package's ``>=`` floor in pyproject.toml."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = list(project["dependencies"])
  for extra in project["optional-dependencies"].values():
    reqs += extra
  found = {}
  for req in reqs:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", req.replace(" ", ""))
    if m and m.group(1) in PACKAGES:
      found[m.group(1)] = m.group(2)
  found.setdefault("jaxlib", found["jax"])
  missing = [p for p in PACKAGES if p not in found]
  if missing:
    sys.exit(f"pyproject.toml declares no '>=' floor for {missing}: the compat test needs one.")
  python = re.fullmatch(r">=(\d+\.\d+)", project["requires-python"].replace(" ", ""))
  if not python:
    sys.exit(f"requires-python={project['requires-python']!r} must read '>=X.Y'.")
  return python.group(1), found


def find_python(version: str) -> str:
  """``pythonX.Y`` on PATH, else in pyenv's versions; exits with a clear message if absent."""
  root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
  found = sorted(Path(root, "versions").glob(f"{version}.*/bin/python{version}"), reverse=True)
  for exe in [shutil.which(f"python{version}"), *map(str, found)]:
    # (a pyenv shim is on PATH even where that version is not selected: try it)
    if exe and subprocess.run([exe, "--version"], capture_output=True).returncode == 0:
      return exe
  sys.exit(
    f"python{version} was found neither on PATH nor under {root}/versions: install Python "
    f"{version} (e.g. `pyenv install {version}`) to run this compat check."
  )


def run(cmd: list[str], **kw) -> None:
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def main(mode: str) -> None:
  if mode == "min":
    version, pins = floors()
    specs = [f"{p}=={v}" for p, v in pins.items()]
  elif mode == "new":
    version, specs = NEWEST_PYTHON, [f"{p}" for p in PACKAGES]
  else:
    sys.exit(f"mode={mode!r}: use 'min' or 'new'.")
  venv = ROOT / ".venv-compat" / mode
  py = venv / "bin" / "python"
  stamp = venv / "requested.txt"
  wanted = "\n".join([version, *specs, *TOOLS])
  if not stamp.exists() or stamp.read_text() != wanted:
    shutil.rmtree(venv, ignore_errors=True)
    run([find_python(version), "-m", "venv", str(venv)])
    run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([str(py), "-m", "pip", "install", "-q", *specs, *TOOLS])
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", "."])
    stamp.write_text(wanted)
  freeze = subprocess.run(
    [str(py), "-m", "pip", "freeze"], check=True, capture_output=True, text=True
  ).stdout
  names = {p.replace("_", "-") for p in (*PACKAGES, "scipy")}
  lines = [ln for ln in freeze.splitlines() if ln.split("==")[0].lower() in names]
  pyver = subprocess.run([str(py), "--version"], capture_output=True, text=True).stdout.strip()
  resolved = "\n".join([pyver, *lines])
  (venv / "versions.txt").write_text(resolved + "\n")
  print(f"[compat {mode}] resolved:\n{resolved}", flush=True)
  # -p no:cacheprovider: the venvs share the checkout; -o addopts keeps the doctests and
  # the default 'not slow' selection of pyproject.toml explicit here.
  run([str(py), "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", *COMPAT_TESTS])


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "min")
