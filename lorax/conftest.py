"""Doctests run with the same strict JAX settings as the tests."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
