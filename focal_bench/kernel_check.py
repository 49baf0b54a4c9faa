"""``python -m focal_bench.kernel_check``: the gradient kernels on the device at hand, against
float64.

The Pallas kernels of `focal_jax._categorical_kernel` (Triton on CUDA, Mosaic on TPU; on CUDA
softmax_focal at C <= 32 takes the Triton one too) are tested on the CPU in interpret mode
only; their compiled numerics need the device. For each loss, shape and dtype this compiles
one `jit(grad(mean loss))` step (gamma 2) on the default device,
says whether the kernel is in the compiled program, and compares its gradient, and the XLA
form's (the same step traced with `FOCAL_JAX_GPU_KERNEL=0` and `FOCAL_JAX_TPU_KERNEL=0`), with
the gradient of the float64 reference formula (`focal_reference`, autodiff on the CPU): the
largest error relative to the largest entry of the reference. It is one step of
`focal-bench gpu` (`gpu_check`), and runs on any device (no kernel on a CPU: both columns are
the XLA form there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

SHAPES = (("categorical", 2048, 30522), ("categorical", 16384, 91), ("categorical", 65536, 2),
          ("categorical", 1539, 7), ("softmax", 131072, 16), ("softmax", 1539, 7))
DRY_SHAPES = (("categorical", 64, 1000), ("categorical", 40, 7), ("softmax", 40, 7))
DTYPES = ("float32", "bfloat16")
# The largest error relative to the gradient's largest entry that passes: float32 steps
# agree with float64 to ~1e-6; bfloat16 inputs are rounded first, so the reference is
# computed from the rounded inputs and the gradient is rounded once (2^-8).
LIMITS = {"float32": 1e-4, "bfloat16": 1e-2}
_KERNEL_ENVS = ("FOCAL_JAX_GPU_KERNEL", "FOCAL_JAX_TPU_KERNEL")
_KERNEL_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


def _data(loss: str, n: int, c: int, seed: int):
  """Logits and targets (probabilities for categorical, int32 labels for softmax)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  z = (rng.normal(size=(n, c)) * 3).astype(np.float32)
  if loss == "softmax":
    y = rng.integers(0, c, size=n).astype(np.int32)
  else:
    y = rng.dirichlet(np.ones(c) * 0.5, size=n).astype(np.float32)
  z[0, : min(3, c)] = 1.5  # a tie at the max
  z[1, 1 % c] = 40.0  # s -> 1 at the top class
  return z, y


def _step(loss: str, kernel: bool):
  """A fresh jit(grad(mean loss)), traced with or without the kernels (the variables are read
  when the loss is traced)."""
  import jax
  import focal_jax
  fn = lambda z, y: getattr(focal_jax, f"{loss}_focal")(z, y, gamma=2.0, reduction="mean")
  step = jax.jit(jax.grad(fn))
  old = {k: os.environ.get(k) for k in _KERNEL_ENVS}

  def run(z, y):
    for k in _KERNEL_ENVS:
      if kernel:
        os.environ.pop(k, None)
      else:
        os.environ[k] = "0"
    try:
      compiled = step.lower(z, y).compile()
      return compiled(z, y), compiled.as_text()
    finally:
      for k, v in old.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v

  return run


def _reference(loss: str, z, y):
  """d mean(loss) / dz in float64 on the CPU: autodiff of the textbook formula."""
  import jax
  import numpy as np
  import focal_reference
  cpu = jax.devices("cpu")[0]
  y = y if loss == "softmax" else y.astype(np.float64)
  with jax.enable_x64(True), jax.default_device(cpu):
    fn = lambda z: getattr(focal_reference, f"{loss}_focal")(z, y, gamma=2.0, reduction="mean",
                                                              compute="float64")
    return np.asarray(jax.jit(jax.grad(fn))(z.astype(np.float64)))


def check(shapes=SHAPES, dtypes=DTYPES) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  device = jax.devices()[0]
  rows = []
  for i, (loss, n, c) in enumerate(shapes):
    z32, y0 = _data(loss, n, c, seed=i)
    for dtype in dtypes:
      z = jnp.asarray(z32, dtype)
      y = jnp.asarray(y0) if loss == "softmax" else jnp.asarray(y0, dtype)
      ref = _reference(loss, np.asarray(z, np.float64), np.asarray(y))
      scale = float(np.abs(ref).max())
      row: dict[str, Any] = {"loss": loss, "n": n, "c": c, "dtype": dtype,
                             "limit": LIMITS[dtype]}
      for name, kernel in (("kernel", True), ("xla", False)):
        grad, hlo = _step(loss, kernel)(z, y)
        err = float(np.abs(np.asarray(grad, np.float64) - ref).max()) / scale
        row[f"{name}_rel_err"] = err
        if kernel:
          row["kernel_in_program"] = any(call in hlo for call in _KERNEL_CALLS)
      row["ok"] = all(row[f"{k}_rel_err"] <= row["limit"] for k in ("kernel", "xla"))
      rows.append(row)
  return {"schema": "focal-bench-kernel-check/1", "device": str(device),
          "device_kind": getattr(device, "device_kind", ""), "jax": jax.__version__,
          "rows": rows}


def markdown(doc: dict[str, Any]) -> str:
  lines = [f"The gradient kernels on {doc['device_kind'] or doc['device']} "
           f"(jax {doc['jax']}): largest error / largest entry of the float64 gradient", "",
           "| loss | shape | dtype | kernel in program | kernel | XLA form | limit | ok |",
           "|---|---|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    lines.append(f"| {r['loss']} | {r['n']}x{r['c']} | {r['dtype']} | {r['kernel_in_program']} | "
                 f"{r['kernel_rel_err']:.2e} | {r['xla_rel_err']:.2e} | {r['limit']:.0e} | "
                 f"{'yes' if r['ok'] else 'NO'} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m focal_bench.kernel_check",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--dry", action="store_true", help="small shapes (any device)")
  p.add_argument("--json", help="write the rows here")
  p.add_argument("--md", help="write the table here")
  args = p.parse_args(argv)
  doc = check(DRY_SHAPES if args.dry else SHAPES)
  text = markdown(doc)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(doc, f, indent=1)
  if args.md:
    with open(args.md, "w") as f:
      f.write(text)
  sys.stdout.write(text)
  return 0 if all(r["ok"] for r in doc["rows"]) else 1


if __name__ == "__main__":
  raise SystemExit(main())
