"""``python -m parity_tests`` / ``focal-parity``: the parity report.

Sweeps a grid of configurations (built in; ``--quick`` for a smaller one; ``--gamma``,
``--alpha``, ``--classes``, ``--reduction``, ``--dtype`` for a user's own) through the same
comparisons the pytest suite makes (``parity_tests.compare``, ``deepspeed_checks``,
``anchors``), prints one row per comparison and dtype, optionally writes JSON, and exits 1 if
any comparison fails. No network; the reference data ships in ``parity_tests/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Sequence

# Before jax is imported: float64 cases need x64; the report runs on the CPU unless told
# otherwise.
os.environ.setdefault("JAX_ENABLE_X64", "1")

from parity_tests.cases import DTYPES, REDUCTIONS  # noqa: E402
from parity_tests.compare import Check  # noqa: E402
from parity_tests.deepspeed_checks import DIVERGES  # noqa: E402
from parity_tests.grid import Settings, tasks  # noqa: E402

_DTYPE_ORDER = {d: i for i, d in enumerate(DTYPES)}


def _alpha(text: str):
  """``none``, a float, or comma-separated per-class floats."""
  if text.lower() == "none":
    return None
  parts = [float(p) for p in text.split(",") if p]
  if len(parts) == 1:
    return parts[0]
  return tuple(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  prog = os.path.basename(sys.argv[0] or "")
  p = argparse.ArgumentParser(
      prog="python -m parity_tests" if prog in ("__main__.py", "") else prog,
      description="Parity report: focal_jax vs focal_torch, both vs DeepSpeed's FocalLoss "
                  "(recorded values and an oracle), and both vs torchvision, optax, "
                  "torch/optax cross-entropy and imbalanced-losses. Exits 1 on any failure.")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
  p.add_argument("--quick", action="store_true", help="a smaller grid (about 40 configurations)")
  p.add_argument("--gamma", type=float, nargs="+", metavar="G",
                 help="focusing parameter(s) to check instead of the built-in ones")
  p.add_argument("--alpha", type=_alpha, nargs="+", metavar="A",
                 help="class weights: none, a scalar, or C comma-separated values")
  p.add_argument("--classes", type=int, nargs="+", metavar="C", help="number(s) of classes")
  p.add_argument("--reduction", choices=REDUCTIONS, nargs="+", help="reduction(s)")
  p.add_argument("--dtype", choices=DTYPES, nargs="+", help="input dtype(s)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--failures", type=int, default=10, metavar="N",
                 help="print at most N failing configurations (default 10)")
  args = p.parse_args(argv)
  if args.gamma and any(g < 0 for g in args.gamma):
    p.error("--gamma: values must be >= 0")
  if args.classes and any(c < 2 for c in args.classes):
    p.error("--classes: values must be >= 2")
  for a in args.alpha or []:
    if isinstance(a, tuple) and args.classes and any(len(a) != c for c in args.classes):
      p.error(f"--alpha: {len(a)} per-class values do not match --classes {args.classes}")
    if isinstance(a, tuple) and not args.classes:
      args.classes = [len(a)]
  return args


def run(settings: Settings, progress: bool = True) -> list[Check]:
  """Run every task of the grid; an exception becomes a failing check (never a crash)."""
  from tqdm import tqdm
  todo = tasks(settings)
  checks: list[Check] = []
  bar = tqdm(todo, desc="parity", unit="config", disable=not progress, file=sys.stderr,
             dynamic_ncols=True)
  for family, config in bar:
    try:
      checks.extend(family(config))
    except Exception as e:  # noqa: BLE001 (reported as a failure with its message)
      from parity_tests.tolerances import Tolerance
      name = family.__name__.replace("checks_", "")
      desc = config.describe() if hasattr(config, "describe") else repr(config)[:120]
      dtype = getattr(config, "dtype", "?")
      checks.append(Check(f"{name}: error", str(dtype), desc, float("inf"), float("inf"),
                          float("inf"), float("inf"), Tolerance(0.0, 0.0), False,
                          f"{type(e).__name__}: {e}"))
  return checks


def summarize(checks: list[Check]) -> list[dict]:
  """One row per (comparison, dtype): counts, worst errors, tolerance, pass/fail."""
  rows: dict[tuple[str, str], dict] = {}
  for c in checks:
    r = rows.setdefault((c.comparison, c.dtype), {
        "comparison": c.comparison, "dtype": c.dtype, "configs": 0, "failed": 0,
        "value_abs": 0.0, "value_rel": 0.0, "grad_abs": 0.0, "grad_rel": 0.0,
        "tol_value": c.tol.value, "tol_grad": c.tol.grad,
        "expects": "differ" if c.note == DIVERGES else "agree"})
    r["configs"] += 1
    r["failed"] += 0 if c.ok else 1
    for k in ("value_abs", "value_rel", "grad_abs", "grad_rel"):
      r[k] = max(r[k], getattr(c, k))
    r["tol_value"] = max(r["tol_value"], c.tol.value)
    r["tol_grad"] = max(r["tol_grad"], c.tol.grad)
  for r in rows.values():
    r["passed"] = r["failed"] == 0
  return list(rows.values())


def _fmt(x: float) -> str:
  if x == 0:
    return "0"
  if x == float("inf"):
    return "inf"
  return f"{x:.1e}"


def format_table(rows: list[dict]) -> str:
  head = ["comparison", "dtype", "configs", "value abs", "value rel", "grad abs", "grad rel",
          "tolerance (value / grad)", "result"]
  lines = []
  for r in rows:
    if r["expects"] == "differ":
      tol = "must differ"
    else:
      tol = f"{_fmt(r['tol_value'])} / {_fmt(r['tol_grad'])}"
    result = "PASS" if r["passed"] else f"FAIL ({r['failed']})"
    lines.append([r["comparison"], r["dtype"], str(r["configs"]), _fmt(r["value_abs"]),
                  _fmt(r["value_rel"]), _fmt(r["grad_abs"]), _fmt(r["grad_rel"]), tol, result])
  widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
            for i, h in enumerate(head)]
  right = {2, 3, 4, 5, 6}

  def fmt_line(cells):
    return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))
  out = [fmt_line(head), fmt_line(["-" * w for w in widths])]
  out += [fmt_line(l) for l in lines]
  return "\n".join(out)


def _versions() -> dict:
  out = {"python": platform.python_version()}
  for mod in ("jax", "torch", "optax", "numpy", "imbalanced_losses"):
    try:
      m = __import__(mod)
      out[mod] = getattr(m, "__version__", "?")
    except ImportError:
      out[mod] = None
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  settings = Settings(quick=args.quick, gamma=args.gamma, alpha=args.alpha,
                      classes=args.classes, reduction=args.reduction, dtype=args.dtype)
  import jax
  jax.config.update("jax_enable_x64", True)
  start = time.perf_counter()
  checks = run(settings, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  rows = summarize(checks)
  rows.sort(key=_sort_key)
  failures = [c for c in checks if not c.ok]
  passed = not failures and bool(checks)
  print(format_table(rows))
  print()
  if failures:
    print(f"{len(failures)} of {len(checks)} checks FAILED; first {min(args.failures, len(failures))}:")
    for c in failures[: args.failures]:
      print("  - " + c.message())
  print(f"{'PASS' if passed else 'FAIL'}: {len(checks)} checks, {len(rows)} comparisons, "
        f"{elapsed:.1f} s. Errors are norm-wise (max|a - b| / max|reference|); tolerances "
        f"from float64 budgets, see parity_tests/tolerances.py.")
  if args.json:
    payload = {
        "passed": passed, "seconds": round(elapsed, 2), "checks": len(checks),
        "settings": {"quick": args.quick, "gamma": args.gamma,
                     "alpha": [list(a) if isinstance(a, tuple) else a
                               for a in args.alpha] if args.alpha else None,
                     "classes": args.classes, "reduction": args.reduction,
                     "dtype": args.dtype},
        "versions": _versions(), "rows": rows,
        "failures": [{"comparison": c.comparison, "dtype": c.dtype, "config": c.config,
                      "value_rel": c.value_rel, "grad_rel": c.grad_rel,
                      "tol_value": c.tol.value, "tol_grad": c.tol.grad, "note": c.note}
                     for c in failures],
    }
    with open(args.json, "w") as f:
      json.dump(payload, f, indent=1, default=_json_default)
  return 0 if passed else 1


# Row families in print order; matched in ``_MATCH_ORDER`` (linear rows also mention the
# float64 reference, so they are matched first).
_GROUPS = ("JAX vs torch", "float64 reference", "linear_softmax_focal", "DeepSpeed (recorded)",
           "DeepSpeed oracle", "torchvision", "optax.sigmoid_focal", "F.cross_entropy",
           "optax.softmax_cross", "F.binary_cross", "optax.sigmoid_binary",
           "SoftmaxFocalLoss", "SigmoidFocalLoss", "1-D alpha", "saturated", "0<gamma<1")
_MATCH_ORDER = sorted(range(len(_GROUPS)), key=lambda i: (i not in (0, 2), i))
# Checked in this order (the drop-in before plain torch); the number is the sort rank.
_PACKAGES = (("DeepSpeed", 0), ("JAX", 1), ("torch FocalLoss", 3), ("torch", 2))


def _sort_key(row: dict) -> tuple:
  """Family, then dtype, then package; divergences last; errors at the very end."""
  name = row["comparison"]
  group = next((i for i in _MATCH_ORDER
                if (name == _GROUPS[i] if i == 0 else _GROUPS[i] in name)), len(_GROUPS))
  package = next((rank for p, rank in _PACKAGES if name.startswith(p)), len(_PACKAGES))
  return (group, _DTYPE_ORDER.get(row["dtype"], 9), package, name)


def _json_default(x):
  if isinstance(x, float) and x != x:
    return None
  return str(x)


if __name__ == "__main__":
  sys.exit(main())
