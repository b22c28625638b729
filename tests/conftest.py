"""Test-session set-up: 8 fake CPU devices (for mesh tests) and float32 matmuls.

XLA_FLAGS must be set before jax initialises its backends, so it is done here, at import of the
first conftest, not inside individual tests.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
