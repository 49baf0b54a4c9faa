"""Shared pytest setup for tests/ and parity_tests/.

Runs before any test module imports jax, so the settings below take effect:
- 4 host CPU devices, for pmap / shard_map / sharded-jit tests;
- float64 enabled (float64 references; float64 inputs stay float64);
- rank promotion raises, to catch silent broadcasting in the library;
- a hypothesis profile chosen by HYPOTHESIS_PROFILE, defaulting to "ci" when CI=true.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "dev", max_examples=60, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
_default = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))

try:
  import jax
except ImportError:  # torch-only environments still run the torch tests
  jax = None
else:
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")

try:
  import torch
except ImportError:
  torch = None
else:
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
