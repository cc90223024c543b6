"""Flatness diagnostics: Hessian spectra, sharpness and loss landscapes in JAX."""

from nrs_jax.flatness._hessian import EigenResult
from nrs_jax.flatness._hessian import TraceResult
from nrs_jax.flatness._hessian import hessian_metrics
from nrs_jax.flatness._hessian import hessian_spectral_density
from nrs_jax.flatness._hessian import hessian_trace
from nrs_jax.flatness._hessian import hvp
from nrs_jax.flatness._hessian import layerwise_hessian
from nrs_jax.flatness._hessian import top_hessian_eigenvalues
from nrs_jax.flatness._landscape import filter_normalized_direction
from nrs_jax.flatness._landscape import loss_landscape_1d
from nrs_jax.flatness._landscape import loss_landscape_2d
from nrs_jax.flatness._sharpness import average_sharpness
from nrs_jax.flatness._sharpness import nrs_divergence
from nrs_jax.flatness._sharpness import worst_case_sharpness

__all__ = (
  "EigenResult",
  "TraceResult",
  "average_sharpness",
  "filter_normalized_direction",
  "hessian_metrics",
  "hessian_spectral_density",
  "hessian_trace",
  "hvp",
  "layerwise_hessian",
  "loss_landscape_1d",
  "loss_landscape_2d",
  "nrs_divergence",
  "top_hessian_eigenvalues",
  "worst_case_sharpness",
)
