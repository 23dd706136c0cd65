"""Test configuration: 8 fake CPU devices, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Tests compare against float64 references: no TF32/bf16 matmul passes on GPU.
jax.config.update("jax_default_matmul_precision", "highest")

# Property tests: a fixed seed by default, so that CI and every fresh clone run
# the same examples; `HYPOTHESIS_PROFILE=explore make test` searches afresh
# with many more examples (run it after touching numerics).
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
