"""The API reference lists every public name, and the site's sources name real files."""

import re
from pathlib import Path

import pytest

import nrs_jax
import nrs_jax.flatness
import nrs_jax.integrations.equinox
import nrs_jax.integrations.linen
import nrs_jax.integrations.nnx

DOCS = Path(__file__).resolve().parents[1] / "docs"
PUBLIC_MODULES = (
  nrs_jax,
  nrs_jax.flatness,
  nrs_jax.integrations.nnx,
  nrs_jax.integrations.linen,
  nrs_jax.integrations.equinox,
)


def test_api_page_lists_every_public_name():
  text = (DOCS / "api.md").read_text()
  for module in PUBLIC_MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      if isinstance(obj, tuple):  # the option-name constants: listed with their values
        assert f"`nrs_jax.{name}` | `{obj}`" in text, name
      elif type(obj).__name__ != "module":
        assert re.search(rf"^   {name}$", text, re.M), f"{module.__name__}.{name}"


_NUMBER = re.compile(r"(?<![\w.])-?\d+\.?\d*(?:e-?\d+)?")


_CHECK = re.compile(r"\b(isclose|allclose)\(|\babs\(.*\) <")


def _informative(want: str, source: str = "") -> bool:
  """An example that shows a computed number (other than 0 and 1, not only True/False, names
  or counts of one), or checks one against a reference within a tolerance (``isclose``,
  ``allclose``, ``abs(...) <``): a closed form, numpy, an exact Hessian."""
  return bool(_CHECK.search(source)) or any(
    float(n) not in (0.0, 1.0) for n in _NUMBER.findall(want)
  )


def test_every_public_callable_has_a_docstring_example_that_shows_a_value():
  """Every public callable has an example, and one of its outputs is a computed number.
  The bug this catches: an example that prints ``True`` for ``pen > 0`` or a count of 1,
  which a penalty off by a factor, a swapped KL or a dropped neighbour still passes."""
  import doctest

  parser = doctest.DocTestParser()
  weak = []
  for name, obj in _public_callables():
    assert ">>>" in (obj.__doc__ or ""), f"{name} has no example"
    if not any(_informative(e.want, e.source) for e in parser.get_examples(obj.__doc__)):
      weak.append(name)
  assert not weak, f"examples that show no computed value: {weak}"
  assert not _informative("True\n") and not _informative("(1, 0.0)", "pen > 0")
  assert _informative("'0.008411'\n") and _informative("[None, (1, 3)]")
  assert _informative("True\n", "bool(jnp.isclose(pen, kl, rtol=1e-4))")


@pytest.mark.slow
def test_a_wrong_penalty_fails_the_docstring_examples(monkeypatch):
  """The examples would catch a plausible bug: a KL that is twice too large (or swapped
  with the reverse KL) changes the printed penalty of nrs_penalty, make_nrs_loss and
  add_nrs_gradient, so their doctests fail."""
  import doctest

  from nrs_jax import _divergence

  def run(obj):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(obj, globs={}):
      runner.run(test, out=lambda _: None)
    return runner.summarize(verbose=False).failed

  targets = (nrs_jax.nrs_penalty, nrs_jax.make_nrs_loss, nrs_jax.add_nrs_gradient)
  assert [run(f) for f in targets] == [0, 0, 0]
  for wrong in (lambda p, q: 2.0 * _divergence.kl(p, q), _divergence.reverse_kl):
    monkeypatch.setitem(_divergence._BY_NAME, "kl", wrong)
    assert all(run(f) > 0 for f in targets)


def test_tutorials_use_jax_shard_map_and_explain_check_vma():
  for page in DOCS.rglob("*.md"):
    assert "jax.experimental.shard_map" not in page.read_text(), page
  scaling = (DOCS / "tutorials" / "scaling.md").read_text()
  assert "jax.shard_map(" in scaling and "check_vma=True" in scaling


def _public_callables():
  for module in PUBLIC_MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      if not (isinstance(obj, tuple) or type(obj).__name__ == "module"):
        yield f"{module.__name__}.{name}", obj


def test_public_functions_that_raise_document_it():
  """A public function whose own code raises or runs one of the argument checks has a
  ``Raises:`` section, as optax's docstrings do (the bug: a new check whose error the
  reference never mentions, so users meet it only at run time)."""
  import inspect

  missing = []
  for name, obj in _public_callables():
    if not inspect.isfunction(obj):
      continue
    body = inspect.getsource(obj).split('"""')[-1]  # the code after the docstring
    if re.search(r"\braise\b|check_|perturbed_leaf_mask|Sampler\(", body):
      if "Raises:" not in (obj.__doc__ or ""):
        missing.append(name)
  assert not missing, missing


def test_code_pointers_to_the_docs_name_pages_that_exist():
  """A ``(docs: page)`` pointer in the library names a page of docs/ (``_order_tie`` pointed
  to docs/method.md, which never explained it; its docstring does now)."""
  root = DOCS.parent / "nrs_jax"
  for path in root.rglob("*.py"):
    for pages in re.findall(r"\(docs: ([\w, ]+)\)", path.read_text()):
      for page in pages.split(","):
        assert (DOCS / f"{page.strip()}.md").exists(), (path, page)
  from nrs_jax import _strategies

  doc = _strategies._order_tie.__doc__
  assert "docs" not in doc and "scheduler" in doc and "exactly zero" in doc
