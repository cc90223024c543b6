"""The demo's plots are drawn from the runs' metrics (curves, not just a PNG header)."""

import json

import numpy as np

from experiments import plots  # (selects the Agg backend)
from experiments.plots import plt


def test_plot_runs_draws_every_run_and_skips_missing_ones(tmp_path):
  for name, acc in (("sgd", 0.6), ("nrs", 0.7)):
    (tmp_path / name).mkdir()
    rows = [
      {
        "epoch": e,
        "train_accuracy": acc + 0.02 * e,
        "test_accuracy": acc + 0.01 * e,
        "train_loss": 1.0 / (e + 1),
        **({"hessian/lambda_max": 10.0 / (e + 1)} if e % 2 else {}),
      }
      for e in range(1, 6)
    ]
    (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  paths = plots.plot_runs(str(tmp_path), ["sgd", "nrs", "missing"])
  assert [p.rsplit("/", 1)[1] for p in paths] == ["accuracy.png", "hessian.png"]
  img = plt.imread(paths[0])[..., :3]
  # Two runs in two default colours (blue and orange) on a white canvas.
  blue = np.all(np.abs(img - np.array([31, 119, 180]) / 255) < 0.05, -1).mean()
  orange = np.all(np.abs(img - np.array([255, 127, 14]) / 255) < 0.05, -1).mean()
  assert blue > 1e-4 and orange > 1e-4, (blue, orange)
  assert (img.mean(-1) > 0.95).mean() > 0.5
  only_curves = plots.plot_runs(str(tmp_path), ["missing"])
  assert [p.rsplit("/", 1)[1] for p in only_curves] == ["accuracy.png"]  # no eigenvalues: no plot
