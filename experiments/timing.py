"""Side-by-side timing for the benchmarks (no dependency beyond jax)."""

from __future__ import annotations

import statistics
import time

import jax


def interleaved_medians(fns: dict, repeats: int) -> dict:
  """Median seconds per call of each ``label: (fn, args)``, timed round-robin. Two warm-up calls
  each, then ``repeats`` rounds that time every function once in turn: a change in machine load
  hits all rows alike instead of whichever row was running, which is what keeps the ratios
  comparable on a shared host."""
  for fn, args in fns.values():
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  times = {label: [] for label in fns}
  for _ in range(repeats):
    for label, (fn, args) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[label].append(time.perf_counter() - t)
  return {label: statistics.median(ts) for label, ts in times.items()}
