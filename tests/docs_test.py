"""The API reference lists every public name, and the site's sources name real files."""

import re
from pathlib import Path

import nrs_jax
import nrs_jax.flatness
import nrs_jax.integrations.linen
import nrs_jax.integrations.nnx

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_api_page_lists_every_public_name():
  text = (DOCS / "api.md").read_text()
  for module in (
    nrs_jax,
    nrs_jax.flatness,
    nrs_jax.integrations.nnx,
    nrs_jax.integrations.linen,
  ):
    for name in module.__all__:
      obj = getattr(module, name)
      if isinstance(obj, tuple):  # the option-name constants: listed with their values
        assert f"`nrs_jax.{name}` | `{obj}`" in text, name
      elif type(obj).__name__ != "module":
        assert re.search(rf"^   {name}$", text, re.M), f"{module.__name__}.{name}"


def test_every_public_callable_has_a_docstring_example():
  for module in (nrs_jax, nrs_jax.flatness, nrs_jax.integrations.nnx, nrs_jax.integrations.linen):
    for name in module.__all__:
      obj = getattr(module, name)
      if isinstance(obj, tuple) or type(obj).__name__ == "module":
        continue
      assert ">>>" in (obj.__doc__ or ""), f"{module.__name__}.{name} has no example"
