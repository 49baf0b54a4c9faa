"""The two packages keep one vocabulary (issue 13, items 1-3): a rename in one package, a check
added to one `_checks` module only, or a docs/math.md name the code no longer uses fails here.

These read the source and the modules' signatures, not values: what they guard is naming.
"""

import dataclasses
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSSES = ("softmax", "sigmoid", "categorical")

# Quantities both packages derive, under these names, in their `_<loss>.py` (or `_checks.py`).
SHARED = {
    "softmax": ("m", "s_rest", "u", "log_p", "log_q", "focal", "lse", "a", "b", "valid",
                "in_range", "t"),
    "sigmoid": ("x", "y", "p", "bce", "log_1m_pt", "focal", "alpha_t", "r", "p_minus_y",
                "dloss_dx", "valid"),
    "categorical": ("z", "y", "top", "m", "log_s", "s", "focal", "coef", "r", "w", "w_sum",
                    "valid"),
}

# Checks only one framework has, and why. Every other public check is in both modules.
JAX_ONLY = {
    "class_split": "torch resolves class_process_group in _class_split.resolve",
    "compute_dtype": "torch keeps it in _numerics (issue 13, item 2)",
    "fits": "integer dtypes narrower than C: traced labels are never read on the host",
    "in_classes": "the same, for [0, C)",
    "not_equal": "the same, for ignore_index / background_class",
    "integer_array": "torch checks the labels' dtype inside labels(integer=True)",
    "num_classes": "torch raises on C = 0 where it finds the class dim",
    "real_array": "jnp.asarray accepts lists and NumPy arrays; torch takes tensors",
    "same_shape": "torch checks shapes inside labels / where_mask",
    "split_class_vector": "JAX slices alpha/gamma for a class shard inside the loss",
}
TORCH_ONLY = {
    "checks_enabled": "value checks read tensors on the host; JAX values are traced",
    "label_range": "the same (reads the labels)",
    "unit_interval": "the same (reads soft labels)",
    "no_grad_needed": "requires_grad exists in torch only",
    "process_group": "torch.distributed groups (JAX names axes)",
    "same_device": "tensor devices (JAX places arrays itself)",
    "shape_str": "message formatting for torch.Size",
}
# Parameter names that differ on purpose: each framework's own word for the class axis.
SAME_PARAMETER = {("axis", "dim")}


def _public_functions(module):
  return {n for n, f in vars(module).items()
          if inspect.isfunction(f) and f.__module__ == module.__name__ and not n.startswith("_")}


def _identifiers(path: pathlib.Path) -> set[str]:
  return set(re.findall(r"\b[A-Za-z_][A-Za-z_0-9]*\b", path.read_text()))


def _names_table(loss: str) -> list[str]:
  """The names in the first column of the Names table of `loss`'s section of docs/math.md."""
  text = (ROOT / "docs" / "math.md").read_text()
  start = text.index(f"## {loss.capitalize()}")
  end = text.index("\n## ", start + 1)
  names = []
  for line in text[start:end].splitlines():
    if line.startswith("| `"):
      names += re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", line.split("|")[1])
  return names


@pytest.mark.parametrize("loss", LOSSES)
def test_shared_quantities_have_one_name_in_both_packages(loss):
  for package in ("focal_jax", "focal_torch"):
    found = _identifiers(ROOT / package / f"_{loss}.py") | _identifiers(
        ROOT / package / "_checks.py")
    missing = [n for n in SHARED[loss] if n not in found]
    assert not missing, f"{package}/_{loss}.py no longer names {missing} (docs/math.md)"


@pytest.mark.parametrize("loss", LOSSES)
def test_math_md_names_are_the_code_names(loss):
  names = _names_table(loss)
  assert set(SHARED[loss]) <= set(names), "docs/math.md lacks a shared name"
  found = set()
  for package in ("focal_jax", "focal_torch"):
    found |= _identifiers(ROOT / package / f"_{loss}.py") | _identifiers(
        ROOT / package / "_checks.py")
  stale = [n for n in names if n not in found]
  assert not stale, f"docs/math.md names {stale}, which neither package's _{loss}.py uses"


def test_checks_modules_define_the_same_checks():
  jax_checks = pytest.importorskip("focal_jax._checks")
  torch_checks = pytest.importorskip("focal_torch._checks")
  in_jax, in_torch = _public_functions(jax_checks), _public_functions(torch_checks)
  assert in_jax - in_torch == set(JAX_ONLY), "a check in focal_jax._checks only"
  assert in_torch - in_jax == set(TORCH_ONLY), "a check in focal_torch._checks only"
  shared = in_jax & in_torch
  assert len(shared) >= 12
  for name in sorted(shared):
    # The function's name for messages aside ("fn", which softmax_masks in JAX has no use for),
    # the first parameter: what is checked, under the same name.
    p_jax, p_torch = ([p for p in inspect.signature(getattr(m, name)).parameters if p != "fn"][:1]
                      for m in (jax_checks, torch_checks))
    pairs = {(a, b) for a, b in zip(p_jax, p_torch) if a != b}
    assert pairs <= SAME_PARAMETER, f"_checks.{name}: parameters {p_jax} vs {p_torch}"


@pytest.mark.parametrize("loss", LOSSES + ("linear",))
def test_each_loss_takes_one_frozen_options_value(loss):
  for package in ("focal_jax", "focal_torch"):
    module = pytest.importorskip(f"{package}._{loss}")
    options = getattr(module, f"{loss.capitalize()}Options")
    assert dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen
    fields = {f.name for f in dataclasses.fields(options)}
    assert "split" in fields or loss == "sigmoid", f"{package} {options.__name__}: {fields}"
