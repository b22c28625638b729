"""Test-session set-up: 8 fake CPU devices (for mesh tests) and float32 matmuls.

XLA_FLAGS must be set before jax initialises its backends, so it is done here, at import of the
first conftest, not inside individual tests.
"""
import os

from helpers import CPU_COLLECTIVE_FLAGS  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

os.environ.setdefault("XLA_FLAGS",
                      f"--xla_force_host_platform_device_count=8 {CPU_COLLECTIVE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
