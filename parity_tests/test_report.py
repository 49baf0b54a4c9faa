"""``python -m parity_tests``: runs with no arguments beyond --quick, writes JSON, exits 0 when
everything agrees and 1 when anything fails; its options reach the grid."""

import json
import os
import subprocess
import sys

import pytest

from parity_tests import grid, report
from parity_tests.compare import Check
from parity_tests.tolerances import Tolerance


def test_quick_report_runs_in_a_subprocess_and_writes_json(tmp_path):
  out = tmp_path / "parity.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "parity_tests", "--quick", "--no-progress",
                         "--json", str(out)], capture_output=True, text=True, env=env,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  data = json.loads(out.read_text())
  assert data["passed"] is True and data["failures"] == []
  rows = {(r["comparison"], r["dtype"]) for r in data["rows"]}
  for name in ("JAX vs torch", "JAX vs float64 reference", "torch vs float64 reference"):
    assert {(name, d) for d in ("float64", "float32", "bfloat16", "float16")} <= rows
  names = {r["comparison"] for r in data["rows"]}
  for pkg in ("JAX", "torch"):
    assert f"{pkg} vs DeepSpeed (recorded)" in names
    assert f"{pkg} vs DeepSpeed oracle" in names
    assert f"{pkg} vs torchvision sigmoid_focal_loss (recorded)" in names
  assert any("[divergence]" in n for n in names)
  for r in data["rows"]:
    assert r["configs"] > 0 and r["passed"]
    assert set(r) >= {"value_abs", "value_rel", "grad_abs", "grad_rel", "tol_value",
                      "tol_grad"}
  # The table went to stdout, one line per row.
  assert "JAX vs torch" in proc.stdout and "PASS:" in proc.stdout
  assert data["versions"]["jax"] and data["versions"]["torch"]


def _check(ok: bool) -> Check:
  return Check("JAX vs torch", "float32", "cfg", 1e-9, 1e-8 if ok else 1.0, 0.0, 0.0,
               Tolerance(1e-6, 1e-6), ok)


def test_a_failing_check_fails_the_report(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(report, "run", lambda settings, progress: [_check(True), _check(False)])
  out = tmp_path / "r.json"
  assert report.main(["--quick", "--json", str(out)]) == 1
  data = json.loads(out.read_text())
  assert data["passed"] is False and len(data["failures"]) == 1
  assert "FAIL (1)" in capsys.readouterr().out
  monkeypatch.setattr(report, "run", lambda settings, progress: [_check(True)])
  assert report.main(["--quick"]) == 0


def test_an_exception_in_a_comparison_is_a_failure_not_a_crash(monkeypatch):
  def boom(config):
    raise TypeError("softmax_focal: unexpected keyword")
  monkeypatch.setattr(report, "tasks", lambda settings: [(boom, grid.Settings())])
  checks = report.run(grid.Settings(), progress=False)
  assert len(checks) == 1 and not checks[0].ok and "TypeError" in checks[0].note


def test_user_configuration_reaches_every_family():
  s = grid.Settings(gamma=[0.5], alpha=[0.25], classes=[91], reduction=["mean"],
                    dtype=["float32"])
  tasks = grid.tasks(s)
  cross = [c for f, c in tasks if f.__name__ == "checks_cross_framework"]
  assert cross and all(c.dtype == "float32" and c.reduction == "mean" for c in cross)
  assert all(c.gamma == 0.5 for c in cross)
  assert all(c.shape[c.axis] == 91 for c in cross)
  oracle = [c for f, c in tasks if f.__name__ == "checks_oracle"]
  assert oracle and all(c.c == 91 and c.gamma == 0.5 and c.size_average for c in oracle)


def test_per_class_alpha_on_the_command_line_sets_the_classes():
  args = report.parse_args(["--alpha", "0.5,1,2", "--gamma", "1"])
  assert args.alpha == [(0.5, 1.0, 2.0)] and args.classes == [3]
  with pytest.raises(SystemExit):
    report.parse_args(["--alpha", "0.5,1,2", "--classes", "4"])
  with pytest.raises(SystemExit):
    report.parse_args(["--gamma", "-1"])


def test_quick_grid_is_smaller_than_the_default():
  assert len(grid.tasks(grid.Settings(quick=True))) * 3 < len(grid.tasks(grid.Settings()))
