"""The benchmark harness runs and writes what it promises (nothing here is about speed)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from focal_bench import memory, report

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """One ``focal-bench --quick`` run in a fresh interpreter; its exit code, JSON and folder."""
  out = tmp_path_factory.mktemp("bench")
  env = dict(os.environ)
  # The root conftest forces 4 host devices for the sharding tests; the harness wants one.
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=4", "").strip()
  proc = subprocess.run(
      [sys.executable, "-m", "focal_bench", "--quick", "--no-progress",
       "--json", str(out / "bench.json"), "--out", str(out)],
      env=env, capture_output=True, text=True, timeout=600)
  doc = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else None
  return proc, doc, out


def test_quick_run_exits_zero_and_prints_tables(quick_run):
  proc, _, _ = quick_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "focal-bench on" in proc.stdout
  assert "| implementation |" in proc.stdout


def test_quick_json_has_a_timed_and_measured_record_per_reference(quick_run):
  _, doc, _ = quick_run
  assert doc is not None and doc["schema"] == "focal-bench/1"
  assert doc["machine"]["cpu"] and doc["machine"]["versions"]["jax"]
  modes = {r["problem"]["mode"] for r in doc["results"]}
  assert modes == {"softmax", "sigmoid", "categorical", "linear"}
  # The peers that need nothing from focal_jax / focal_torch must all have run.
  peers = {"jax_optax_ce", "jax_copy", "torch_ce", "torch_deepspeed", "torch_copy",
           "jax_optax_sigmoid_focal", "torch_torchvision", "jax_linear_materialized_ce",
           "torch_linear_materialized_ce", "jax_optax_categorical_ce", "torch_ce_probs"}
  refs = [r for r in doc["results"] if r["impl"] in peers]
  assert {r["impl"] for r in refs} == peers
  for r in refs:
    t, m = r["time"], r["memory"]
    assert t["status"] == "ok", (r["impl"], t)
    assert 0 < t["min"] <= t["median"] <= t["max"] and t["reps"] == len(t["samples"]) >= 3
    assert m["status"] == "ok" and m["extra_peak_bytes"] > 0, (r["impl"], m)
  for r in doc["results"]:  # the project's lines ran, or say why not
    assert r["time"]["status"] in ("ok", "unavailable", "error")
    assert r["time"]["status"] == "ok" or r["time"]["reason"]


def test_quick_copy_floor_measures_about_one_logits_of_memory(quick_run):
  # A fresh-output copy allocates exactly one array of the logits' size: the instrument must
  # read about 1.0x, in both frameworks (page rounding and small buffers aside).
  _, doc, _ = quick_run
  floors = [r for r in doc["results"] if r["role"] == "floor" and r["problem"]["c"] == 1000]
  assert {r["framework"] for r in floors} == {"jax", "torch"}
  for r in floors:
    assert 0.8 <= r["ratios"]["extra_peak_x_logits"] <= 1.3, r


def test_quick_writes_png_plots_and_report(quick_run):
  _, _, out = quick_run
  import matplotlib.image
  for mode in ("softmax", "sigmoid", "categorical"):
    path = out / f"{mode}.png"
    assert path.read_bytes()[:8] == _PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100
  assert "## Targets" in (out / "report.md").read_text()


def test_quick_categorical_mode_times_and_measures_both_frameworks(quick_run):
  # The categorical mode: focal_jax / focal_torch categorical_focal against the probability
  # cross-entropy of optax and F.cross_entropy, at every quick class count, each line timed,
  # measured and divided by its reference.
  _, doc, _ = quick_run
  recs = [r for r in doc["results"] if r["problem"]["mode"] == "categorical"]
  want = {"jax_categorical_focal", "jax_optax_categorical_ce", "torch_categorical_focal",
          "torch_ce_probs"}  # quick: no torch.compile
  cs = {r["problem"]["c"] for r in recs}
  assert cs == set(doc["settings"]["classes"]) and cs
  for c in cs:
    at_c = {r["impl"]: r for r in recs if r["problem"]["c"] == c}
    assert set(at_c) == want, (c, set(at_c))
    for key, r in at_c.items():
      p = r["problem"]
      assert p["n"] == doc["settings"]["budget"] // c and p["dtype"] == "float32"
      assert r["time"]["status"] == "ok", (key, r["time"])
      assert 0 < r["time"]["min"] <= r["time"]["median"] <= r["time"]["max"]
      assert r["memory"]["status"] == "ok", (key, r["memory"])
      # The gradient alone is as large as the logits.
      assert r["ratios"]["extra_peak_x_logits"] >= 0.8, (key, r["ratios"])
    for key, ref in (("jax_categorical_focal", "jax_optax_categorical_ce"),
                     ("torch_categorical_focal", "torch_ce_probs")):
      assert at_c[key]["ref"] == ref and at_c[key]["ratios"]["time_x_ref"] > 0
      assert at_c[key]["ratios"]["extra_peak_x_ref"] > 0
  text = report.markdown(doc, "machine")
  assert "## categorical" in text and "focal_jax.categorical_focal" in text


def test_categorical_problem_has_smoothed_one_hot_targets():
  from focal_bench import problems
  p = problems.Problem("categorical", 64, 10, seed=3)
  data = problems.make_data(p)
  z, y = data["logits"], data["targets"]
  assert z.shape == y.shape == (64, 10) and y.dtype == np.float32
  eps = problems.CATEGORICAL_SMOOTHING
  np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
  assert np.allclose(np.sort(y, axis=1)[:, :-1], eps / 10)
  assert np.allclose(y.max(axis=1), 1 - eps + eps / 10)
  np.testing.assert_array_equal(problems.make_data(p)["targets"], y)  # seeded


def test_peak_rss_reset_sees_a_known_allocation():
  if not memory.rss_peak_works():
    pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
  size = 96 * 2**20
  before = memory.rss_bytes()
  memory.reset_peak_rss()
  buf = np.ones(size // 8)
  del buf
  rise = memory.peak_rss_bytes() - before
  assert size - 4 * 2**20 <= rise <= size + 8 * 2**20


def _rec(impl, n, c, median, extra=None, ref=None, vs_ds=False, role="project", fw="torch"):
  p = {"mode": "softmax", "n": n, "c": c, "h": 0, "dtype": "float32", "seed": 0,
       "target": True}
  r = {"problem": p, "impl": impl, "name": impl, "framework": fw, "role": role,
       "ref": ref, "vs_deepspeed": vs_ds,
       "time": {"status": "ok", "median": median, "min": 0.5 * median}}
  if extra is not None:
    r["memory"] = {"status": "ok", "extra_peak_bytes": extra}
  return r


def test_targets_compare_ratios_with_design_limits():
  n, c = 2048, 30522
  logits = n * c * 4
  recs = [
      _rec("torch_ce", n, c, 0.100, role="reference", vs_ds=True),
      _rec("torch_deepspeed", n, c, 0.600, role="deepspeed"),
      _rec("torch_focal", n, c, 0.160, extra=2 * logits, ref="torch_ce", vs_ds=True),
      _rec("jax_optax_ce", n, c, 0.100, role="reference", fw="jax"),
      _rec("jax_focal", n, c, 0.120, extra=logits, ref="jax_optax_ce", vs_ds=True, fw="jax"),
  ]
  report.add_ratios(recs)
  checks = {(t["id"], t["shape"]): t for t in report.targets(recs)}
  shape = f"({n}, {c})"
  t = checks[("torch_time_vs_ce_eager", shape)]
  assert t["measured"] == pytest.approx(1.6) and t["met"] is False
  t = checks[("torch_vs_deepspeed_eager", shape)]
  assert t["measured"] == pytest.approx(3.75) and t["met"] is True
  t = checks[("jax_time_vs_optax", shape)]
  assert t["measured"] == pytest.approx(1.2) and t["met"] is True
  t = checks[("jax_vs_deepspeed", shape)]
  assert t["measured"] == pytest.approx(5.0) and t["met"] is True
  assert checks[("memory_torch_focal", shape)]["met"] is False
  assert checks[("memory_jax_focal", shape)]["measured"] == pytest.approx(1.0)
  assert checks[("torch_time_vs_ce_compiled", shape)]["met"] is None  # not measured
  assert "MISSED by 1.07x" in report.targets_table(report.targets(recs))
  slow = [_rec("torch_deepspeed", n, c, 0.100, role="deepspeed"),
          _rec("torch_focal", n, c, 0.200, vs_ds=True)]
  report.add_ratios(slow)
  t = {x["id"]: x for x in report.targets(slow)}["torch_vs_deepspeed_eager"]
  assert t["measured"] == pytest.approx(0.5) and t["met"] is False
  assert "MISSED by 3.00x" in report.targets_table([t])


def test_quick_liger_lines_say_why_they_did_not_run_without_cuda(quick_run):
  # Liger-Kernel (Triton) and the gamma-0 line compared with it run on CUDA only; elsewhere
  # their records must say so rather than vanish.
  import torch
  if torch.cuda.is_available():
    pytest.skip("CUDA present: the Liger lines run")
  _, doc, _ = quick_run
  lines = {r["impl"]: r for r in doc["results"]
           if r["impl"] in ("torch_linear_liger_ce", "torch_linear_focal_gamma0")}
  assert set(lines) == {"torch_linear_liger_ce", "torch_linear_focal_gamma0"}
  for r in lines.values():
    assert r["time"]["status"] == "unavailable" and "CUDA" in r["time"]["reason"], r["time"]


def test_linear_shape_option_parses_and_rejects_bad_shapes():
  from focal_bench import cli
  assert cli._linear_shape("8192x4096x128256") == (8192, 4096, 128256)
  for bad in ("4096x512", "4096x0x8", "axbxc"):
    with pytest.raises(SystemExit, match="--linear-shape must be NxHxV"):
      cli._linear_shape(bad)


def test_only_keys_of_one_mode_run_that_mode_alone(tmp_path):
  # --only with the keys of one mode: the other modes have nothing to run and are skipped
  # (they used to reach the timer with no implementation and divide by zero).
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=4", "").strip()
  proc = subprocess.run(
      [sys.executable, "-m", "focal_bench", "--quick", "--no-progress", "--no-memory",
       "--only", "jax_copy", "--json", str(tmp_path / "bench.json")],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / "bench.json").read_text())
  assert {r["impl"] for r in doc["results"]} == {"jax_copy"}
  from focal_bench import timing
  assert timing.time_interleaved({}, {}, min_reps=3, max_reps=5, budget_s=1.0) == ({}, {})


def test_each_framework_is_timed_in_rounds_of_its_own(monkeypatch):
  """No JAX call is timed between two torch calls (or the reverse): the frameworks' idle
  worker threads would slow each other's calls on a machine with few cores."""
  from focal_bench import cli, problems
  from focal_bench.implementation import PROJECT, Impl, Runner
  calls: list[str] = []

  def impl(key: str, framework: str) -> Impl:
    return Impl(key, key, framework, "softmax", PROJECT,
                lambda problem, x: Runner(run=lambda: calls.append(framework)))
  monkeypatch.setattr(cli, "_prepare", lambda framework: lambda problem, data: data)
  impls = [impl("a", "jax"), impl("b", "torch"), impl("c", "jax"), impl("d", "torch")]
  s = {"warmup": 1, "min_reps": 5, "max_reps": 5, "time_budget": 0.1}
  records = cli._time_problem(problems.Problem("softmax", 8, 3), impls, s, None)
  assert [r["time"]["reps"] for r in records] == [5, 5, 5, 5]
  timed = calls[len(impls):]  # after the one warm-up call of each
  switches = sum(a != b for a, b in zip(timed, timed[1:]))
  assert len(timed) == 20 and switches == 1, timed
