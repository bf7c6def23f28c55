"""Strict test settings: float64 on (gradient checks need it), warnings are
errors (pyproject), hypothesis without deadlines (JAX compiles on first call)."""

import hypothesis
import jax

jax.config.update("jax_enable_x64", True)

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")
