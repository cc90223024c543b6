"""Research harness for nrs_jax: Flax models, data, methods and training loops."""
