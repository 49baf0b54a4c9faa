"""The distribution as users install it: the wheel's contents, and each framework alone.

``test_wheel_*`` build a wheel of the checkout (or take ``$FOCAL_WHEEL``) and read it as a zip:
the five packages and nothing else at the top level, their data files, the metadata's name and
extras. The ``*_alone`` tests run in virtual environments that ``.ci/run`` builds from the wheel
(not an editable install) with one framework each, ``pip install "focal-losses[jax]"`` and
``pip install torch==2.13.0 && pip install "focal-losses[torch]"``, named by
``$FOCAL_JAX_ONLY_PYTHON`` and ``$FOCAL_TORCH_ONLY_PYTHON``; elsewhere they are skipped, unless
``$FOCAL_REQUIRE_PACKAGING`` is set (CI), where a missing environment is a failure.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "focal-losses"
PACKAGES = {"focal_jax", "focal_torch", "focal_reference", "parity_tests", "focal_bench"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  given = os.environ.get("FOCAL_WHEEL")
  if given:
    return Path(given)
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(out), str(ROOT)], check=True, timeout=300,
                 capture_output=True)
  (path,) = out.glob("*.whl")
  return path


def test_wheel_holds_the_packages_their_data_and_nothing_generic(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert top == PACKAGES
  for pkg in PACKAGES:
    assert f"{pkg}/__init__.py" in names
  for data in ("focal_jax/py.typed", "focal_torch/py.typed",
               "parity_tests/data/deepspeed_focal_loss.npz",
               "parity_tests/data/torchvision_sigmoid_focal.npz",
               "focal_reference/deepspeed.py", "focal_reference/torchvision.py"):
    assert data in names, data


def test_wheel_metadata_names_the_distribution_and_its_extras(wheel):
  zf = zipfile.ZipFile(wheel)
  (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
  meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
  assert meta["Name"] == DIST
  extras = set(meta.get_all("Provides-Extra"))
  assert {"jax", "torch", "parity", "bench", "examples", "docs", "test"} <= extras
  requires = meta.get_all("Requires-Dist")
  by_extra = {}
  for req in requires:
    name, _, marker = req.partition(";")
    extra = marker.split("extra ==")[-1].strip().strip("'\"") if "extra" in marker else ""
    by_extra.setdefault(extra, []).append(name.strip())
  assert by_extra[""] == ["numpy>=1.24"]
  # Each framework extra pulls its framework only.
  assert [r for r in by_extra["jax"] if "torch" in r] == []
  assert [r for r in by_extra["torch"] if "jax" in r] == []
  entry_points = zf.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
  assert "focal-parity = parity_tests.report:main" in entry_points
  assert "focal-bench = focal_bench.cli:main" in entry_points


# Runs inside the one-framework environment, from a directory outside the checkout.
CHECK = textwrap.dedent("""
  import importlib.util, json, sys
  import numpy as np
  import focal_reference
  present, absent = sys.argv[1], sys.argv[2]
  assert importlib.util.find_spec(absent) is None, absent + " is installed"
  rng = np.random.default_rng(0)
  z = rng.normal(size=(8, 5)) * 3
  t = rng.integers(0, 5, 8)
  y = rng.random((8, 5))
  q = rng.dirichlet(np.ones(5), 8)
  cases = [("softmax_focal", z, t, dict(alpha=0.25, gamma=0.5, reduction="mean")),
           ("sigmoid_focal", z, y, dict(gamma=2.0, reduction="sum")),
           ("categorical_focal", z, q, dict(gamma=2.0, reduction="mean"))]
  if present == "jax":
    import jax.numpy as jnp
    import focal_jax as lib
    run = lambda fn, a, b, kw: float(getattr(lib, fn)(jnp.asarray(a, jnp.float32), b, **kw))
  else:
    import torch
    import focal_torch as lib
    def run(fn, a, b, kw):
      b = torch.as_tensor(b) if b.dtype.kind == "i" else torch.tensor(b, dtype=torch.float32)
      return float(getattr(lib, fn)(torch.tensor(a, dtype=torch.float32), b, dim=-1, **kw))
    loss = lib.FocalLoss(5)(torch.tensor(z, dtype=torch.float32), torch.as_tensor(t))
    assert abs(float(loss) - float(focal_reference.softmax_focal(z, t, reduction="mean"))) < 1e-5
  for fn, a, b, kw in cases:
    got, want = run(fn, a, b, kw), float(getattr(focal_reference, fn)(a, b, **kw))
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (fn, got, want)
  print(json.dumps({"package": lib.__file__, "reference": focal_reference.__file__}))
""")


def _alone(env_var: str, present: str, absent: str, tmp_path: Path) -> None:
  python = os.environ.get(env_var)
  if not python:
    if os.environ.get("FOCAL_REQUIRE_PACKAGING"):
      pytest.fail(f"${env_var} is not set (CI builds that environment in .ci/run)")
    pytest.skip(f"${env_var} not set: .ci/run builds a {present}-only environment")
  out = subprocess.run([python, "-c", CHECK, present, absent], cwd=tmp_path, text=True,
                       capture_output=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  where = out.stdout.strip().splitlines()[-1]
  # Installed from the wheel into that environment, not imported from this checkout.
  assert str(ROOT) not in where and "site-packages" in where, where


def test_jax_alone(tmp_path):
  _alone("FOCAL_JAX_ONLY_PYTHON", "jax", "torch", tmp_path)


def test_torch_alone(tmp_path):
  _alone("FOCAL_TORCH_ONLY_PYTHON", "torch", "jax", tmp_path)
