"""Shared pytest setup for tests/ and parity_tests/.

Runs before any test module imports jax, so the settings below take effect:
- 4 host CPU devices, for pmap / shard_map / sharded-jit tests;
- float64 enabled (float64 references; float64 inputs stay float64);
- rank promotion raises, to catch silent broadcasting in the library;
- a hypothesis profile chosen by HYPOTHESIS_PROFILE, defaulting to "ci" when CI=true;
- JAX's persistent compilation cache in a directory made for this run (see below).
"""

import os
import shutil
import tempfile

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

# JAX's persistent compilation cache, in a directory made for this run and deleted at its end
# (pytest-xdist workers inherit the variable, so they share it; subprocesses ignore it). An eager
# call compiles the same XLA program again at every call when its scan or custom rule is traced
# anew (linear_softmax_focal: ~1 s a call on 2 cores); with the cache the repeats are loads.
# Same program, same executable: nothing a test checks changes. FOCAL_TEST_COMPILE_CACHE=0 turns
# it off.
_CACHE_VAR = "FOCAL_TEST_JAX_CACHE_DIR"
_own_cache_dir = None
if jax is not None and os.environ.get("FOCAL_TEST_COMPILE_CACHE", "1") != "0":
  if not os.environ.get(_CACHE_VAR):
    _own_cache_dir = os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="focal-jax-cache-")
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """Deletes the compilation cache made by this process (the xdist controller's, or a plain
  run's) after every test, workers included, has finished."""
  if _own_cache_dir:
    shutil.rmtree(_own_cache_dir, ignore_errors=True)

try:
  import torch
except ImportError:
  torch = None
else:
  # Under pytest-xdist the workers share the cores: one torch thread each on 2 cores.
  _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
  torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // max(1, _workers))))


# Under pytest-xdist `--dist loadscope` (the README's test command) each module is one unit of
# work, handed out in collection order once this conftest turns off xdist's own order (most
# tests first, which puts the one-test subprocess modules last). The slowest modules go first
# (longest first, measured on 2 cores), so the two workers end together; the rest keep their
# order. A module missing here only costs balance.
SLOWEST_FIRST = (  # sum of test durations per module, -n 2 run of 2026-11-30
    "tests/focal_jax/test_linear.py",
    "tests/test_bench_quick.py",
    "tests/focal_torch/test_compile.py",
    "tests/focal_jax/test_class_axis.py",
    "tests/focal_jax/test_edge_inputs.py",  # measured alone since its checks run under jit
    "tests/focal_jax/test_distributed.py",
    "parity_tests/test_anchors.py",
    "parity_tests/test_argument_table.py",
    "tests/focal_jax/test_softmax.py",
    "parity_tests/test_migrations.py",
    "parity_tests/test_cross_framework.py",
    "tests/test_gpu_check.py",
    "tests/focal_jax/test_class_sharded.py",
    "parity_tests/test_report.py",
    "parity_tests/test_divergences.py",
    "tests/focal_torch/test_class_parallel.py",
    "tests/test_aot.py",
    "tests/test_examples.py",
    "tests/focal_torch/test_distributed.py",  # measured alone (one test, two gloo ranks)
)


def pytest_configure(config):
  if getattr(config.option, "dist", "no") == "loadscope":
    config.option.loadscopereorder = False  # keep the order given below


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
