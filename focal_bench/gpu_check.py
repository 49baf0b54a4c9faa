"""``focal-bench gpu``: the prepared benchmark for a session that has a GPU for a few minutes.

One command runs the focal-bench harness (``focal_bench.cli``) three times, each in its own
process, and gathers the records:

1. softmax, sigmoid and categorical at the target shapes in float32: focal_jax under ``jit``,
   focal_torch eager and ``torch.compile``, against optax, ``F.cross_entropy`` (eager and
   compiled; with probabilities for categorical), the DeepSpeed algorithm, Liger-Kernel's
   cross-entropy (when it imports), torchvision's sigmoid focal loss, and the copy floors;
2. the same in bfloat16;
3. the fused linear mode at (8192 x 4096) @ (4096 x 128256) bfloat16: linear_softmax_focal
   (JAX and torch) against the materialized path and Liger's fused linear cross-entropy;

and then ``focal_bench.kernel_check``: categorical_focal's gradient kernel (Triton on CUDA)
compiled on the device against float64, beside the XLA form.

It writes ``gpu.json`` (every record of the three runs, with the machine and the device's
name) and ``gpu.md`` (the harness's tables under a heading naming the device) into ``--out``.
``--dry`` runs the same three steps on tiny shapes, with few repetitions and no memory probes,
on whatever device there is (CPU in CI: tests/test_gpu_check.py); ``--install`` first installs
what is missing with this interpreter's pip (jax[cuda12], torch, optax, tqdm, matplotlib,
liger-kernel), so that a bare machine needs one command (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

# The harness's target shapes and issue 6's linear shape.
SHAPES = ("2048x30522", "16384x91")
LINEAR_SHAPE = "8192x4096x128256"
DRY_SHAPES = ("64x1000", "256x91")
DRY_LINEAR_SHAPE = "128x64x2048"
# What --install adds when the module is missing (module: pip requirement).
REQUIREMENTS = {"jax": "jax[cuda12]==0.10.2", "torch": "torch==2.13.0", "optax": "optax",
                "tqdm": "tqdm", "matplotlib": "matplotlib", "liger_kernel": "liger-kernel"}


def steps(dry: bool, compile_torch: bool = True) -> list[tuple[str, list[str]]]:
  """(name, focal-bench arguments) of each run."""
  shapes = list(DRY_SHAPES if dry else SHAPES)
  common = ["--no-progress"]
  if dry:
    common += ["--min-reps", "1", "--max-reps", "2", "--time-budget", "0.05", "--warmup", "1",
               "--no-memory"]
  if not compile_torch:
    common += ["--no-compile"]
  out = []
  for dtype in ("float32", "bfloat16"):
    out.append((f"losses_{dtype}",
                ["--modes", "softmax", "sigmoid", "categorical", "--shapes", *shapes,
                 "--dtype", dtype, *common]))
  out.append(("linear_bfloat16", ["--linear", "--linear-shape",
                                  DRY_LINEAR_SHAPE if dry else LINEAR_SHAPE,
                                  "--dtype", "bfloat16", *common]))
  return out


def install(python: str = sys.executable) -> list[str]:
  """pip-install the modules of REQUIREMENTS that do not import; the requirements installed."""
  missing = [req for mod, req in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]
  if missing:
    subprocess.run([python, "-m", "pip", "install", *missing], check=True)
  if importlib.util.find_spec("focal_jax") is None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-e", root], check=True)
    missing.append(root)
  return missing


def device_name(doc: dict[str, Any]) -> str:
  """The accelerator a run used, from its machine record ("CPU only" without one)."""
  m = doc.get("machine", {})
  names = []
  if m.get("torch_cuda_device"):
    names.append(f"torch: {m['torch_cuda_device']}")
  if m.get("jax_backend") and m["jax_backend"] != "cpu":
    names.append(f"jax: {m['jax_devices'][0] if m.get('jax_devices') else m['jax_backend']}")
  return "; ".join(names) or f"CPU only ({m.get('cpu', 'unknown CPU')})"


def run(out_dir: str, dry: bool = False, compile_torch: bool = True,
        timeout_s: float = 3600) -> dict[str, Any]:
  """Run every step; write gpu.json and gpu.md into ``out_dir``; the merged document."""
  os.makedirs(out_dir, exist_ok=True)
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
  # The test conftest forces 4 host devices for its sharding tests; the harness wants one.
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=4", "").strip()
  runs, texts = [], []
  for name, args in steps(dry, compile_torch):
    path = os.path.join(out_dir, f"{name}.json")
    md_dir = os.path.join(out_dir, name)
    cmd = [sys.executable, "-m", "focal_bench", *args, "--json", path, "--out", md_dir,
           "--label", f"focal-bench gpu{' --dry' if dry else ''}: {name}"]
    print(f"focal-bench gpu: {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    rec: dict[str, Any] = {"name": name, "command": cmd[1:], "exit": proc.returncode,
                           "elapsed_s": round(time.time() - t0, 1)}
    if os.path.exists(path):
      with open(path) as f:
        rec["doc"] = json.load(f)
      with open(os.path.join(md_dir, "report.md")) as f:
        texts.append(f"## {name}\n\n{f.read()}")
    else:
      rec["stderr_tail"] = proc.stderr[-3000:]
      texts.append(f"## {name}\n\nfailed (exit {proc.returncode}):\n\n```\n"
                   f"{proc.stderr[-1500:]}\n```\n")
    runs.append(rec)
  runs.append(_kernel_check(out_dir, dry, env, timeout_s, texts))
  first = next((r["doc"] for r in runs if "doc" in r), {})
  device = device_name(first)
  doc = {"schema": "focal-bench-gpu/1", "dry": dry, "device": device,
         "machine": first.get("machine"), "runs": runs}
  with open(os.path.join(out_dir, "gpu.json"), "w") as f:
    json.dump(doc, f, indent=1)
  with open(os.path.join(out_dir, "gpu.md"), "w") as f:
    f.write(f"# focal-bench gpu{' --dry' if dry else ''} on {device}\n\n" + "\n".join(texts))
  return doc


def _kernel_check(out_dir: str, dry: bool, env: dict[str, str], timeout_s: float,
                  texts: list[str]) -> dict[str, Any]:
  """Run ``focal_bench.kernel_check``; its record (``doc``: its rows), its table in ``texts``."""
  path, md = (os.path.join(out_dir, f"kernel_check.{ext}") for ext in ("json", "md"))
  cmd = [sys.executable, "-m", "focal_bench.kernel_check", "--json", path, "--md", md]
  cmd += ["--dry"] if dry else []
  print(f"focal-bench gpu: kernel_check: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
  t0 = time.time()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
  rec: dict[str, Any] = {"name": "kernel_check", "command": cmd[1:], "exit": proc.returncode,
                         "elapsed_s": round(time.time() - t0, 1)}
  if os.path.exists(path):
    with open(path) as f:
      rec["doc"] = json.load(f)
    with open(md) as f:
      texts.append(f"## kernel_check\n\n{f.read()}")
  else:
    rec["stderr_tail"] = proc.stderr[-3000:]
    texts.append(f"## kernel_check\n\nfailed (exit {proc.returncode}):\n\n```\n"
                 f"{proc.stderr[-1500:]}\n```\n")
  return rec


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="focal-bench gpu", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="gpu_bench", help="folder for gpu.json, gpu.md and each "
                 "run's JSON and report")
  p.add_argument("--dry", action="store_true",
                 help="tiny shapes, few repetitions, no memory probes (runs on a CPU)")
  p.add_argument("--no-compile", action="store_true", help="leave out torch.compile lines")
  p.add_argument("--install", action="store_true",
                 help="first pip-install the missing packages (see REQUIREMENTS)")
  args = p.parse_args(argv)
  if args.install:
    install()
  doc = run(args.out, dry=args.dry, compile_torch=not args.no_compile)
  print(f"focal-bench gpu: device {doc['device']}; wrote {os.path.join(args.out, 'gpu.md')}",
        flush=True)
  return 0 if all(r["exit"] == 0 for r in doc["runs"]) else 1


if __name__ == "__main__":
  raise SystemExit(main())
