"""nrs_jax: Neighborhood Region Smoothing (Zhao and Zhang, 2022) for JAX and Optax."""

from nrs_jax import flatness
from nrs_jax._divergence import DIVERGENCES
from nrs_jax._divergence import get_divergence
from nrs_jax._divergence import js
from nrs_jax._divergence import kl
from nrs_jax._divergence import output_divergence
from nrs_jax._divergence import reverse_kl
from nrs_jax._divergence import symmetric_kl
from nrs_jax._neighbors import Perturbations
from nrs_jax._neighbors import sample_perturbations
from nrs_jax._options import AGGREGATIONS
from nrs_jax._options import NOISES
from nrs_jax._options import REUSE_RULES
from nrs_jax._options import SCALES
from nrs_jax._options import STRATEGIES
from nrs_jax._penalty import make_nrs_loss
from nrs_jax._penalty import nrs_penalty
from nrs_jax._penalty import strided_subset
from nrs_jax._transform import NRSState
from nrs_jax._transform import RefreshSchedule
from nrs_jax._transform import add_nrs_gradient

__version__ = "0.2.0"

__all__ = (
  "AGGREGATIONS",
  "DIVERGENCES",
  "NOISES",
  "NRSState",
  "Perturbations",
  "REUSE_RULES",
  "RefreshSchedule",
  "SCALES",
  "STRATEGIES",
  "add_nrs_gradient",
  "flatness",
  "get_divergence",
  "js",
  "kl",
  "make_nrs_loss",
  "nrs_penalty",
  "output_divergence",
  "reverse_kl",
  "sample_perturbations",
  "strided_subset",
  "symmetric_kl",
)
