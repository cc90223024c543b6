"""The study's statistics, exact where the data allow: the paired sign-flip permutation test on
the Wilcoxon signed-rank statistic (every one of the 2^n sign patterns, by exact enumeration of
its distribution), its minimum detectable difference at the Holm-adjusted level, Holm's
correction, the paired t-interval and TOST, the stratified Kendall tau, and the metric's
resolution that paired differences are rounded to before any test.

Zero differences follow Wilcoxon's rule: they carry no sign and are dropped before ranking
(``scipy.stats.wilcoxon``'s ``zero_method="wilcox"``); tied absolute differences share their
average rank. With n nonzero differences every sign pattern is equally likely under the null,
so the exact p is the share of the 2^n patterns whose statistic lies as far from its mean as
the observed one."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy import stats

ALPHA, POWER = 0.05, 0.8
MIN_PAIRS = 6  # fewer pairs: "too few pairs", never a p-value
MDD_DRAWS = 4000  # simulated data sets per candidate difference


def resolution(values, largest: int = 100_000) -> float:
  """The grid a metric's values sit on: ``1 / N`` for accuracies over N test examples (the
  smallest N up to ``largest`` with every value within float32 rounding of a multiple of
  1/N), 0 for a continuous metric (then nothing is rounded)."""
  v = np.asarray([x for x in values if math.isfinite(x)], float)
  if v.size == 0 or np.any((v < 0) | (v > 1)):
    return 0.0
  for start in range(1, largest + 1, 4096):
    n = np.arange(start, min(start + 4096, largest + 1))[:, None]
    ok = np.all(np.abs(v * n - np.round(v * n)) < 1e-4, axis=1)
    if ok.any():
      return 1.0 / int(n[np.argmax(ok), 0])
  return 0.0


def differences(a, b, step: float = 0.0) -> np.ndarray:
  """``a - b`` paired by seed, rounded to multiples of ``step`` (the metric's resolution), so
  that true ties are exact zeros and equal magnitudes share a rank."""
  d = np.asarray(a, float) - np.asarray(b, float)
  return d if not step else np.round(d / step) * step


def _sign_pattern_counts(weights) -> np.ndarray:
  """Exact counts, over all 2^n sign patterns, of the sum of the integer ``weights`` whose
  sign is positive: entry s is how many patterns sum to s (Python ints: no rounding)."""
  counts = np.zeros(int(np.sum(weights)) + 1, dtype=object)
  counts[0] = 1
  for r in weights:
    shifted = np.zeros_like(counts)
    shifted[r:] = counts[: len(counts) - r]
    counts = counts + shifted
  return counts


def _signed_rank_counts(d) -> tuple[np.ndarray, int, int]:
  """For the nonzero ``d``: the exact counts of 2 T+ over all 2^n sign patterns (average
  ranks are halves at most, so 2 T+ is an integer), the observed 2 T+, and n."""
  d = np.asarray(d, float)
  d = d[d != 0]
  ranks = stats.rankdata(np.abs(d))
  counts = _sign_pattern_counts(np.round(2 * ranks).astype(np.int64))
  return counts, int(np.round(2 * ranks[d > 0].sum())), len(d)


def signed_rank_exact(d, alternative: str = "two-sided") -> float:
  """Exact p of the paired sign-flip permutation test on the Wilcoxon statistic ``T+`` (the
  sum of the ranks of the positive differences): ``"two-sided"`` (as far from its mean as
  observed), ``"greater"`` (T+ at least the observed) or ``"less"``; 1 when every difference
  is 0."""
  counts, observed, n = _signed_rank_counts(d)
  if n == 0:
    return 1.0
  values = np.arange(len(counts))
  if alternative == "greater":
    far = values >= observed
  elif alternative == "less":
    far = values <= observed
  else:
    centre = (len(counts) - 1) / 2
    far = np.abs(values - centre) >= abs(observed - centre) - 1e-9
  return float(Fraction(int(counts[far].sum()), 2**n))


def exact_tost(d, margin: float) -> float:
  """Equivalence within +-``margin`` by two one-sided exact signed-rank tests (of ``d +
  margin`` > 0 and ``d - margin`` < 0): the larger p."""
  d = np.asarray(d, float)
  return max(signed_rank_exact(d + margin, "greater"), signed_rank_exact(d - margin, "less"))


def holm(ps: list[float]) -> list[float]:
  """Holm's step-down adjustment (controls the family-wise error over ``ps``)."""
  order, out, running = np.argsort(ps, kind="stable"), [0.0] * len(ps), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
    out[i] = running
  return out


def holm_level(ps: list[float], i: int) -> float:
  """The level Holm's step-down compares comparison ``i`` with: alpha / (m - its rank)."""
  rank = list(np.argsort(ps, kind="stable")).index(i)
  return ALPHA / (len(ps) - rank)


def ci(d, level: float = 0.95) -> tuple[float, float, float]:
  """Mean of ``d`` and its two-sided t-interval at ``level``."""
  d = np.asarray(d, float)
  m = float(d.mean())
  if len(d) < 2 or np.all(d == d[0]):
    return m, m, m
  lo, hi = stats.t.interval(level, len(d) - 1, loc=m, scale=stats.sem(d))
  return m, float(lo), float(hi)


def t_test(d) -> float:
  """Two-sided paired t-test p (1 where every difference is 0, 0 where all are equal)."""
  d = np.asarray(d, float)
  if np.all(d == d[0]):
    return 1.0 if d[0] == 0 else 0.0
  return float(stats.ttest_1samp(d, 0.0).pvalue)


def unpaired_tost(a, b, margin: float) -> float:
  """Equivalence of two independent samples' means within +-``margin``: two one-sided Welch
  t-tests, the larger p."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  se = math.sqrt(va + vb)
  diff = float(a.mean() - b.mean())
  if se == 0:
    return 0.0 if abs(diff) < margin else 1.0
  dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  return float(max(stats.t.sf((diff + margin) / se, dof), stats.t.cdf((diff - margin) / se, dof)))


def tost(d, margin: float) -> float:
  """Two one-sided paired t-tests that the mean of ``d`` lies within +-``margin``: the larger
  p (equivalence at level alpha where it is below alpha)."""
  d = np.asarray(d, float)
  se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
  if se == 0:
    return 0.0 if abs(d.mean()) < margin else 1.0
  lower = stats.t.sf((d.mean() + margin) / se, len(d) - 1)
  upper = stats.t.cdf((d.mean() - margin) / se, len(d) - 1)
  return float(max(lower, upper))


def _critical_counts(n: int, level: float) -> tuple[int, int]:
  """The exact test's rejection region for n untied nonzero differences: T+ <= lo or >= hi."""
  cdf = np.cumsum(_sign_pattern_counts(range(1, n + 1))) / 2**n
  lo = int(np.searchsorted(cdf, level / 2, side="right")) - 1  # P(T <= lo) <= level / 2
  return lo, n * (n + 1) // 2 - lo


def mdd(d, level: float, seed: int = 0) -> float:
  """The smallest mean difference the exact signed-rank test detects at ``level`` with 80%
  power, for n pairs at the observed spread: by simulation (normal differences with the
  sample's standard deviation, common random numbers across candidates, bisection)."""
  d = np.asarray(d, float)
  n, sd = len(d), float(np.std(d, ddof=1))
  lo_t, hi_t = _critical_counts(n, level)
  if sd == 0 or lo_t < 0:
    return math.inf if lo_t < 0 else 0.0
  z = np.random.default_rng(seed).standard_normal((MDD_DRAWS, n))

  def power(delta):
    x = delta / sd + z
    r = np.argsort(np.argsort(np.abs(x), axis=1), axis=1) + 1
    t = np.sum(np.where(x > 0, r, 0), axis=1)
    return float(np.mean((t <= lo_t) | (t >= hi_t)))

  low, high = 0.0, 10.0
  while power(high * sd) < POWER:
    high *= 2
  for _ in range(30):
    mid = (low + high) / 2
    low, high = (mid, high) if power(mid * sd) < POWER else (low, mid)
  return high * sd


def stratified_kendall(groups: list[tuple[list, list]]) -> tuple[float, float]:
  """Kendall's tau within strata (each ``(x, y)`` one method's runs), combined: tau = the sum
  of the strata's concordant-minus-discordant counts over their pairs, p from the summed
  statistic's normal approximation (ties corrected per stratum, as ``scipy`` does)."""
  s_total, pairs, var = 0.0, 0.0, 0.0
  for x, y in groups:
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 2:
      continue
    i, j = np.triu_indices(n, 1)
    s_total += float(np.sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])))
    pairs += n * (n - 1) / 2
    var += _kendall_s_variance(x, y)
  if pairs == 0 or var == 0:
    return math.nan, math.nan
  return s_total / pairs, float(2 * stats.norm.sf(abs(s_total) / math.sqrt(var)))


def _kendall_s_variance(x, y) -> float:
  """The null variance of Kendall's S with ties in x and y (Kendall 1970, eq. 4.3)."""
  n = len(x)

  def parts(v):
    _, t = np.unique(v, return_counts=True)
    return (
      float(np.sum(t * (t - 1) * (2 * t + 5))),
      float(np.sum(t * (t - 1))),
      float(np.sum(t * (t - 1) * (t - 2))),
    )

  (a1, a2, a3), (b1, b2, b3) = parts(x), parts(y)
  v = (n * (n - 1) * (2 * n + 5) - a1 - b1) / 18
  v += a2 * b2 / (2 * n * (n - 1))
  if n > 2:
    v += a3 * b3 / (9 * n * (n - 1) * (n - 2))
  return v
