"""Two JAX processes on loopback: `softmax_focal(..., axis_name=...)` under `shard_map`.

Launches `_jax_worker.py` twice (process 0 and 1 of a `jax.distributed` job on 127.0.0.1, gloo
CPU collectives, 2 host CPU devices each: a 4-device mesh spanning both processes). Each worker
runs a linear model with `reduction="mean_positive"` on its shards, averages the per-shard loss
with `lax.pmean` (the data-parallel recipe of docs/design.md) and returns the value and the
gradients.
Positives are spread unevenly (7, 2, 0 and 1 per shard, plus ignored rows), so a shard that
divided by its own positive count would be wrong. The reference is a float64 NumPy formula on the
whole batch in this process. The same loss without `axis_name`, under plain `jit` of the
globally sharded arrays, must give the same numbers. Children are killed on timeout; the test
takes a few seconds.
"""

import functools
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("_jax_worker.py")
TIMEOUT_S = 120
IGNORE = -1
BACKGROUND = 0
GAMMA = 2.0


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  # The root conftest forces 4 devices in this process; each child gets 2.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(7)
  n_features, n_classes = 3, 5
  # 8 rows per device, 4 devices; positives (label != 0) per shard: 7, 2, 0, 1; two ignored rows.
  y = np.array([1, 2, 3, 4, 1, 2, 3, 0,
                0, 0, 2, 0, 0, 4, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 0,
                0, IGNORE, 3, 0, IGNORE, 0, 0, 0], dtype=np.int32)
  x = rng.normal(size=(y.shape[0], n_features)) * 2.0
  w = rng.normal(size=(n_features, n_classes))
  b = rng.normal(size=(n_classes,))
  alpha = np.array([0.25, 1.0, 0.5, 2.0, 0.75])
  return {"x": x, "y": y, "w": w, "b": b, "alpha": alpha}


def _reference_loss(z, y, alpha):
  """float64 mean_positive softmax focal loss: ``focal_reference`` (docs/design.md)."""
  import focal_reference
  return focal_reference.softmax_focal(z, y, alpha=alpha, gamma=GAMMA, ignore_index=IGNORE,
                                       reduction="mean_positive", background_class=BACKGROUND)


@functools.lru_cache(maxsize=None)
def _reference_grad():
  """Float64 JAX autodiff of the same formula, compiled once."""
  import jax
  return jax.jit(jax.grad(_reference_loss))


def _reference(z: np.ndarray, y: np.ndarray, alpha: np.ndarray) -> tuple[float, np.ndarray]:
  """float64 mean_positive softmax focal loss and its gradient w.r.t. the logits."""
  import jax.numpy as jnp
  z = np.asarray(z, np.float64)
  grad = _reference_grad()(jnp.asarray(z), jnp.asarray(y), jnp.asarray(alpha, jnp.float64))
  return float(_reference_loss(z, y, alpha)), np.asarray(grad, np.float64)


def test_numpy_reference_gradient_matches_finite_differences():
  d = _batch()
  z = d["x"] @ d["w"] + d["b"]
  _, grad = _reference(z, d["y"], d["alpha"])
  h = 1e-6
  fd = np.zeros_like(z)
  for i in range(z.shape[0]):
    for c in range(z.shape[1]):
      zp, zm = z.copy(), z.copy()
      zp[i, c] += h
      zm[i, c] -= h
      fd[i, c] = (_reference(zp, d["y"], d["alpha"])[0]
                  - _reference(zm, d["y"], d["alpha"])[0]) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
  tmp = tmp_path_factory.mktemp("multiprocess_jax")
  data_path = tmp / "batch.npz"
  np.savez(data_path, **_batch())
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    out = tmp / f"out{pid}.json"
    log = open(tmp / f"log{pid}.txt", "w")
    procs.append(subprocess.Popen(
        [sys.executable, str(WORKER), str(port), str(pid), "2", str(data_path), str(out)],
        env=_child_env(), stdout=log, stderr=subprocess.STDOUT))
    outs.append(out)
  failed = None
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    failed = f"timed out after {TIMEOUT_S} s"
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = "\n".join(f"--- process {i} ---\n" + (tmp / f"log{i}.txt").read_text() for i in range(2))
  if failed is None and any(p.returncode != 0 for p in procs):
    failed = f"exit codes {[p.returncode for p in procs]}"
  if failed:
    pytest.fail(f"two-process JAX run failed ({failed}):\n{logs}")
  return [json.loads(o.read_text()) for o in outs]


def test_two_processes_form_one_four_device_mesh(two_process_results):
  for i, res in enumerate(two_process_results):
    assert res["process_index"] == i
    assert res["process_count"] == 2
    assert res["device_count"] == 4
    assert res["local_device_count"] == 2


@pytest.mark.parametrize("dtype,rtol,atol", [
    pytest.param("float64", 1e-12, 1e-14, id="float64"),
    pytest.param("float32", 2e-5, 1e-7, id="float32"),
])
def test_shard_map_mean_positive_equals_single_process_reference(two_process_results, dtype, rtol,
                                                                 atol):
  d = _batch()
  z = d["x"] @ d["w"] + d["b"]
  want_value, want_gz = _reference(z, d["y"], d["alpha"])
  want_gw = d["x"].T @ want_gz
  want_gb = want_gz.sum(axis=0)
  for res in two_process_results:
    got = res[dtype]
    assert got["dtype"] == dtype
    np.testing.assert_allclose(got["value"], want_value, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.array(got["grad_logits"]), want_gz, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.array(got["grad_w"]), want_gw, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.array(got["grad_b"]), want_gb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype,rtol,atol", [
    pytest.param("float64", 1e-12, 1e-14, id="float64"),
    pytest.param("float32", 2e-5, 1e-7, id="float32"),
])
def test_jit_over_globally_sharded_arrays_equals_single_process_reference(
    two_process_results, dtype, rtol, atol):
  d = _batch()
  z = d["x"] @ d["w"] + d["b"]
  want_value, want_gz = _reference(z, d["y"], d["alpha"])
  for res in two_process_results:
    got = res[dtype]
    assert got["jit_dtype"] == dtype
    np.testing.assert_allclose(got["jit_value"], want_value, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.array(got["jit_grad_w"]), d["x"].T @ want_gz, rtol=rtol,
                               atol=atol)
    np.testing.assert_allclose(np.array(got["jit_grad_b"]), want_gz.sum(axis=0), rtol=rtol,
                               atol=atol)


def test_shard_local_positive_counts_differ():
  # Guards the test's premise: a per-shard denominator would give a different answer.
  y = _batch()["y"].reshape(4, -1)
  counts = ((y != IGNORE) & (y != BACKGROUND)).sum(axis=1)
  assert len(set(counts.tolist())) == 4
