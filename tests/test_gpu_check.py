"""``focal-bench gpu --dry``: the prepared GPU run works end to end on a CPU (tiny shapes)."""

import json
import os
import subprocess
import sys

import pytest

from focal_bench import gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "focal_bench", "gpu", "--dry", "--no-compile",
                         "--out", str(out)], env=env, capture_output=True, text=True,
                        timeout=900)
  return proc, out


def test_dry_run_exits_zero_and_writes_json_and_markdown(dry_run):
  proc, out = dry_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((out / "gpu.json").read_text())
  assert doc["schema"] == "focal-bench-gpu/1" and doc["dry"] is True
  assert [r["name"] for r in doc["runs"]] == [
      "losses_float32", "losses_bfloat16", "linear_bfloat16", "kernel_check"]
  text = (out / "gpu.md").read_text()
  # The device is named in the heading and in the JSON; here there is none.
  assert text.startswith(f"# focal-bench gpu --dry on {doc['device']}")
  assert doc["device"].startswith("CPU only")
  assert text.count("| implementation |") >= 3


def test_dry_run_times_every_peer_that_can_run_on_a_cpu(dry_run):
  _, out = dry_run
  doc = json.loads((out / "gpu.json").read_text())
  by = {}
  for run in doc["runs"][:-1]:  # the harness' runs (the last one is kernel_check)
    for r in run["doc"]["results"]:
      by.setdefault(r["impl"], []).append(r)
  for key in ("jax_focal", "jax_optax_ce", "torch_focal", "torch_ce", "torch_deepspeed",
              "jax_sigmoid_focal", "torch_sigmoid_focal", "jax_categorical_focal",
              "jax_linear_focal", "torch_linear_focal"):
    assert key in by, key
    assert all(r["time"]["status"] == "ok" for r in by[key]), (key, by[key][0]["time"])
  # Both dtypes ran: the problems record them.
  assert {r["problem"]["dtype"] for r in by["jax_focal"]} == {"float32", "bfloat16"}
  # Liger is CUDA only: recorded as unavailable with the reason, not as an error.
  for key in ("torch_liger_ce", "torch_linear_liger_ce"):
    assert all(r["time"]["status"] == "unavailable" and "CUDA" in r["time"]["reason"]
               for r in by[key]), key


def test_steps_name_the_issue_shapes():
  full = dict(gpu_check.steps(dry=False))
  assert full["linear_bfloat16"][:3] == ["--linear", "--linear-shape", "8192x4096x128256"]
  for dtype in ("float32", "bfloat16"):
    args = full[f"losses_{dtype}"]
    assert "2048x30522" in args and "16384x91" in args and dtype in args
    assert args[args.index("--modes") + 1:args.index("--shapes")] == [
        "softmax", "sigmoid", "categorical"]
    assert "--no-memory" not in args


def test_dry_run_checks_the_categorical_kernel_against_float64(dry_run):
  # On a CPU there is no kernel: both columns are the XLA form, within the float64 limits.
  proc, out = dry_run
  check = json.loads((out / "gpu.json").read_text())["runs"][-1]
  assert check["name"] == "kernel_check" and check["exit"] == 0, check.get("stderr_tail")
  rows = check["doc"]["rows"]
  assert {(r["loss"], r["n"], r["c"], r["dtype"]) for r in rows} == {
      (loss, n, c, d) for loss, n, c in (("categorical", 64, 1000), ("categorical", 40, 7),
                                         ("softmax", 40, 7)) for d in ("float32", "bfloat16")}
  for r in rows:
    assert r["ok"] and not r["kernel_in_program"] and r["kernel_rel_err"] <= r["limit"], r
  assert "## kernel_check" in (out / "gpu.md").read_text()


def test_device_name_prefers_the_accelerator():
  assert gpu_check.device_name({"machine": {"torch_cuda_device": "NVIDIA H100",
                                            "jax_backend": "gpu",
                                            "jax_devices": ["cuda:0"]}}) == \
      "torch: NVIDIA H100; jax: cuda:0"
  assert gpu_check.device_name({"machine": {"cpu": "EPYC", "jax_backend": "cpu"}}) == \
      "CPU only (EPYC)"
