"""PNG plots of training curves written next to the runs."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def plot_runs(workdir: str, runs: list[str]) -> list[str]:
  """accuracy.png (train/test accuracy) and hessian.png (top eigenvalue) over epochs."""
  data = {
    r: _read(os.path.join(workdir, r, "metrics.jsonl"))
    for r in runs
    if os.path.exists(os.path.join(workdir, r, "metrics.jsonl"))
  }
  out = []
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for r, rows in data.items():
    ep = [x["epoch"] for x in rows]
    (line,) = axes[0].plot(ep, [x["train_accuracy"] for x in rows], "--", alpha=0.6)
    axes[0].plot(ep, [x["test_accuracy"] for x in rows], color=line.get_color(), label=r)
    axes[1].plot(ep, [x["train_loss"] for x in rows], color=line.get_color(), label=r)
  axes[0].set(xlabel="epoch", ylabel="accuracy (dashed: train, solid: test)")
  axes[1].set(xlabel="epoch", ylabel="train loss", yscale="log")
  if data:  # (a legend of no runs is a matplotlib warning)
    axes[0].legend()
  fig.tight_layout()
  path = os.path.join(workdir, "accuracy.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  out.append(path)
  fig, ax = plt.subplots(figsize=(5, 4))
  any_h = False
  for r, rows in data.items():
    pts = [(x["epoch"], x["hessian/lambda_max"]) for x in rows if "hessian/lambda_max" in x]
    if pts:
      any_h = True
      ax.plot(*zip(*pts), "o-", label=r)
  if any_h:
    ax.set(xlabel="epoch", ylabel="top Hessian eigenvalue (train loss)", yscale="log")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "hessian.png")
    fig.savefig(path, dpi=100)
    out.append(path)
  plt.close(fig)
  return out
