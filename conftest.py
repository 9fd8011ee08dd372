"""Strict JAX settings for the whole suite: tests and doctests (lorax, experiments)."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
