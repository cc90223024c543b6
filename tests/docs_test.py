"""The API reference lists every public name, and the site's sources name real files."""

import re
from pathlib import Path

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


def test_every_public_callable_has_a_docstring_example():
  for module in PUBLIC_MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      if isinstance(obj, tuple) or type(obj).__name__ == "module":
        continue
      assert ">>>" in (obj.__doc__ or ""), f"{module.__name__}.{name} has no example"


def test_tutorials_use_jax_shard_map_and_explain_check_vma():
  for page in DOCS.rglob("*.md"):
    assert "jax.experimental.shard_map" not in page.read_text(), page
  scaling = (DOCS / "tutorials" / "scaling.md").read_text()
  assert "jax.shard_map(" in scaling and "check_vma=True" in scaling
