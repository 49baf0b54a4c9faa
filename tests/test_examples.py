"""The training example runs end to end (`--quick`) and prints metrics that hold together.

Runs `examples/train_imbalanced.py --quick --out TMP` in a subprocess (about 20-40 s on 2 CPU
cores), then checks the files it wrote and the table it printed: the printed numbers parse,
agree with metrics.json, balanced accuracy is the mean of the printed per-class recalls (the
definition, recomputed here), JAX and torch, trained from the same weights on the same batches,
end up with the same metrics, and every loss went down.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_imbalanced.py"
NUMBER = r"(\d+\.\d+)(?:±\d+\.\d+)?"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[pathlib.Path, str]:
  out = tmp_path_factory.mktemp("train_imbalanced")
  env = dict(os.environ)
  # Run as a user would: the root conftest's 4 forced host devices are for the unit tests.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--out", str(out)],
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, f"example failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
  return out, proc.stdout


def _table(stdout: str) -> tuple[list[str], dict[str, list[float]]]:
  """Column names and rows (label -> one number per column) of the printed results table."""
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("digit (n_train)"))
  columns = lines[start].split()[2:]
  rows = {}
  for line in lines[start + 1:]:
    m = re.match(r"(recall \d+ \(\d+\)|balanced accuracy|macro-F1)\s+(.*)$", line)
    if not m:
      break
    rows[m.group(1)] = [float(v) for v in re.findall(NUMBER, m.group(2))]
  return columns, rows


def test_quick_run_writes_plots_and_metrics(quick_run):
  out, _ = quick_run
  for name in ("loss_curves.png", "per_class_recall.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(data) > 20_000, f"{name} is suspiciously small ({len(data)} bytes)"
  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics["results"]) == {f"{fw}/{loss}" for fw in ("jax", "torch")
                                     for loss in ("ce", "wce", "focal")}


def test_printed_metrics_parse_and_match_metrics_json(quick_run):
  out, stdout = quick_run
  columns, rows = _table(stdout)
  assert columns == ["jax/ce", "jax/wce", "jax/focal", "torch/ce", "torch/wce", "torch/focal"]
  assert len(rows) == 12 and all(len(v) == len(columns) for v in rows.values()), rows
  results = json.loads((out / "metrics.json").read_text())["results"]
  for j, run in enumerate(columns):
    r = results[run]
    recalls = [rows[k][j] for k in rows if k.startswith("recall")]
    np.testing.assert_allclose(recalls, r["recall_mean"], atol=5e-4)
    np.testing.assert_allclose(rows["balanced accuracy"][j], r["balanced_accuracy_mean"], atol=5e-4)
    np.testing.assert_allclose(rows["macro-F1"][j], r["macro_f1_mean"], atol=5e-4)
    # Balanced accuracy is by definition the mean of the per-class recalls.
    np.testing.assert_allclose(rows["balanced accuracy"][j], np.mean(recalls), atol=1e-3)
    assert 0.0 <= rows["macro-F1"][j] <= 1.0
    # The example learned something: far above chance (0.1) on the balanced held-out set.
    assert rows["balanced accuracy"][j] > 0.6, run


def test_jax_and_torch_runs_agree(quick_run):
  out, _ = quick_run
  m = json.loads((out / "metrics.json").read_text())
  for loss in ("ce", "wce", "focal"):
    jx, tr = m["results"][f"jax/{loss}"], m["results"][f"torch/{loss}"]
    # Same weights, same batches: float32 rounding may flip a prediction or two out of 500.
    assert abs(jx["balanced_accuracy_mean"] - tr["balanced_accuracy_mean"]) <= 0.01, loss
    cj, ct = np.array(m["loss_curves"][f"jax/{loss}"]), np.array(m["loss_curves"][f"torch/{loss}"])
    np.testing.assert_allclose(cj, ct, rtol=1e-3)
    assert cj[-1] < 0.2 * cj[0], f"{loss}: training loss did not go down: {cj[0]} -> {cj[-1]}"
