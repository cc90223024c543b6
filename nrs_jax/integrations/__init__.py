"""Optional helpers for Flax (import ``nrs_jax.integrations.nnx`` or ``.linen``; needs flax)."""
