"""Release hygiene: the wheel installs into a clean venv and its doctests pass there."""

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_licence_is_in_the_repository_the_sdist_and_the_wheel(tmp_path):
  """pyproject.toml declares Apache-2.0; the text itself ships in the repository, the sdist
  and the wheel (the bug: a declared licence with no LICENSE file anywhere)."""
  with open(os.path.join(ROOT, "LICENSE")) as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  dist = tmp_path / "dist"
  subprocess.run(
    [sys.executable, "-m", "build", "--outdir", str(dist), ROOT],  # the sdist, then its wheel
    check=True,
    capture_output=True,
    timeout=600,
  )
  (wheel,) = dist.glob("nrs_jax-*.whl")
  (sdist,) = dist.glob("nrs_jax-*.tar.gz")
  with zipfile.ZipFile(wheel) as z:
    licences = [n for n in z.namelist() if n.endswith("licenses/LICENSE")]
    assert licences and z.read(licences[0]).decode() == text
  with tarfile.open(sdist) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("/LICENSE"))
    assert t.extractfile(member).read().decode() == text


@pytest.mark.slow
def test_wheel_installs_in_a_clean_venv_and_its_doctests_pass(tmp_path):
  dist = tmp_path / "dist"
  subprocess.run(
    [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), ROOT],
    check=True,
    capture_output=True,
    timeout=600,
  )
  (wheel,) = dist.glob("nrs_jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert "nrs_jax/py.typed" in names and not any(
    n.startswith(("tests/", "experiments/")) for n in names
  )

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  subprocess.run(
    [python, "-m", "pip", "install", "-q", f"{wheel}[flax,equinox]", "pytest"],
    check=True,
    capture_output=True,
    timeout=1200,
  )
  # From an empty directory, so that the installed package is the one imported.
  out = subprocess.run(
    [
      python,
      "-c",
      "import nrs_jax, sys; print(nrs_jax.__file__); "
      "import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
      "'--doctest-modules', '--pyargs', 'nrs_jax']))",
    ],
    cwd=tmp_path,
    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert str(venv) in out.stdout.splitlines()[0]
  assert " passed" in out.stdout and "failed" not in out.stdout
