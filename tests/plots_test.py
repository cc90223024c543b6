"""Landscape plotting helpers write PNGs from nrs_jax.flatness grids."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plots  # (selects the Agg backend)
from experiments.plots import plt
from nrs_jax import flatness


def test_landscape_pngs(tmp_path):
  params = {"w": jnp.ones((3, 2))}
  loss = lambda p, b: jnp.sum((b @ p["w"]) ** 2)
  x = jnp.ones((4, 3))
  r1 = flatness.loss_landscape_1d(loss, params, x, jax.random.key(0), alphas=np.linspace(-1, 1, 5))
  r2 = flatness.loss_landscape_2d(loss, params, x, jax.random.key(1), alphas=np.linspace(-1, 1, 4))
  p1 = plots.plot_landscape_1d({"a": r1}, str(tmp_path / "l1.png"))
  p2 = plots.plot_landscape_2d(r2, str(tmp_path / "l2.png"), title="t")
  img1, img2 = (plt.imread(p) for p in (p1, p2))
  # a curve on a white canvas: some dark pixels, mostly white
  dark = (img1[..., :3].mean(-1) < 0.5).mean()
  assert 0.001 < dark < 0.3, dark
  # a filled contour: many distinct colours
  colours = np.unique((img2[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
  assert len(colours) > 20, len(colours)
