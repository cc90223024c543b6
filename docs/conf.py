"""Sphinx configuration: ``make docs`` builds it with warnings as errors, offline.

No intersphinx: the inventories live on sites the build machines cannot reach,
so names from other projects are plain text. Tutorials are MyST notebooks
executed at every build (myst-nb) on embedded data.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
# The notebook kernels inherit the environment: `import experiments` works there too,
# and JAX stays on the CPU with the threads this machine has.
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import nrs_jax  # noqa: E402

project = "nrs_jax"
author = "the nrs_jax authors"
copyright = "2026, the nrs_jax authors"
release = version = nrs_jax.__version__

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "tutorials/*.py", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}

autosummary_generate = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_render_markdown_format = "myst"  # Markdown outputs (the benchmark tables) with tables

html_theme = "furo"
html_title = f"nrs_jax {release}"
html_static_path = []
suppress_warnings = ["mystnb.unknown_mime_type"]
