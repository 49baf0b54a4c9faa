"""Extra peak memory of one forward + backward step, measured in fresh subprocesses.

"Extra peak" is how far memory in use rises above what was in use just before the step (the
inputs, the compiled program) at its highest point during the step; the gradient the step
returns counts, so a fused gradient costs at least 1.0x the logits. How it is read:

- CPU (both frameworks): the peak resident set size. Writing ``5`` to ``/proc/self/clear_refs``
  resets ``VmHWM`` (the peak) to the current ``VmRSS`` (Linux >= 4.0); the step then runs and
  ``VmHWM - VmRSS(before)`` is its extra peak. The probe process runs with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that every large buffer is its own mapping that
  goes back to the OS when freed: otherwise freed heap pages would be reused without raising the
  resident size and the peak would be under-counted. ``rss_peak_works()`` checks the reset.
- CUDA (torch): ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``.
- Other JAX backends: ``peak_bytes_in_use`` of the device's ``memory_stats()``; it cannot be
  reset, so each (implementation, shape) gets its own process and the baseline is taken before
  the first call (the warm-up calls are the same step as the measured one).

Run as ``python -m focal_bench.memory`` by the harness; it prints one JSON line after a marker.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any, Callable, Iterable

from focal_bench.problems import Problem, make_data
from focal_bench.registry import Impl, Unavailable, by_key
from focal_bench.timing import warm_up

MARKER = "FOCAL_BENCH_MEMORY_JSON:"
MMAP_THRESHOLD = 65536


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise OSError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
  """Current resident set size of this process (``VmRSS``)."""
  return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
  """Peak resident set size of this process since start or the last reset (``VmHWM``)."""
  return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
  """Reset ``VmHWM`` to the current ``VmRSS`` (Linux: ``echo 5 > /proc/self/clear_refs``)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def rss_peak_works() -> bool:
  """Whether resetting the peak RSS works here: after a 64 MiB buffer is touched and freed, the
  reset must bring ``VmHWM`` back below the buffer's peak."""
  try:
    import numpy as np
    buf = np.ones(64 * 2**20 // 8)
    high = peak_rss_bytes()
    del buf
    reset_peak_rss()
    return peak_rss_bytes() < high - 32 * 2**20
  except OSError:
    return False


def _method(impl: Impl) -> str:
  if impl.framework == "torch":
    import torch
    if torch.cuda.is_available():
      return "cuda_allocator"
  else:
    import jax
    if jax.default_backend() != "cpu":
      return "jax_allocator"
  return "rss"


def _measure_one(impl: Impl, problem: Problem, inputs: dict[str, Any], repeats: int,
                 warmup: int) -> dict[str, Any]:
  """The extra peak of ``repeats`` steps of ``impl`` after ``warmup`` calls (bytes)."""
  method = _method(impl)
  if method == "jax_allocator":
    import jax
    dev = jax.devices()[0]
    base = dev.memory_stats()["bytes_in_use"]
  runner = impl.build(problem, inputs)
  warm_up(runner, warmup)
  samples = []
  if method == "jax_allocator":
    samples.append(dev.memory_stats()["peak_bytes_in_use"] - base)
  for _ in range(repeats if method != "jax_allocator" else 0):
    if runner.setup is not None:
      runner.setup()
    gc.collect()
    if method == "rss":
      before = rss_bytes()
      reset_peak_rss()
      runner.run()
      samples.append(peak_rss_bytes() - before)
    else:
      import torch
      torch.cuda.synchronize()
      before = torch.cuda.memory_allocated()
      torch.cuda.reset_peak_memory_stats()
      runner.run()
      samples.append(torch.cuda.max_memory_allocated() - before)
  del runner
  gc.collect()
  s = sorted(samples)
  return {"extra_peak_bytes": s[len(s) // 2], "samples": samples, "method": method}


def probe(jobs: Iterable[tuple[Problem, list[str]]], repeats: int, warmup: int,
          on_done: Callable[[], None] | None = None) -> list[dict[str, Any]]:
  """Measure each (problem, implementations) job in this process; one record per pair."""
  from focal_bench import impls_jax, impls_torch
  impls = by_key()
  prepare = {"jax": impls_jax.prepare, "torch": impls_torch.prepare}
  records = []
  for problem, keys in jobs:
    data = make_data(problem)
    inputs: dict[str, dict] = {}
    for key in keys:
      impl = impls[key]
      record = {"problem": problem.as_dict(), "impl": key}
      try:
        if impl.framework not in inputs:
          inputs[impl.framework] = prepare[impl.framework](problem, data)
        record.update(_measure_one(impl, problem, inputs[impl.framework], repeats, warmup))
        record["status"] = "ok"
      except Unavailable as e:
        record.update(status="unavailable", reason=str(e))
      except Exception as e:  # a failing implementation must not stop the others
        record.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
      records.append(record)
      if on_done is not None:
        on_done()
    del inputs, data
    gc.collect()
  return records


def run_probes(groups: list[list[tuple[Problem, list[str]]]], repeats: int, warmup: int,
               timeout_s: float, on_done: Callable[[int], None] | None = None
               ) -> list[dict[str, Any]]:
  """Run each group of jobs in its own fresh Python process; collect their records."""
  env = dict(os.environ)
  env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
  records: list[dict[str, Any]] = []
  for jobs in groups:
    spec = [{"problem": p.as_dict(), "impls": keys} for p, keys in jobs]
    cmd = [sys.executable, "-m", "focal_bench.memory", "--repeats", str(repeats),
           "--warmup", str(warmup), "--jobs", json.dumps(spec)]
    n_pairs = sum(len(keys) for _, keys in jobs)
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
      lines = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
      if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
      records.extend(json.loads(lines[-1][len(MARKER):]))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
      for p, keys in jobs:
        for key in keys:
          records.append({"problem": p.as_dict(), "impl": key, "status": "error",
                          "reason": f"memory probe: {e}"[:500]})
    if on_done is not None:
      on_done(n_pairs)
  return records


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--jobs", required=True, help="JSON list of {problem, impls}")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args(argv)
  jobs = [(Problem(**j["problem"]), list(j["impls"])) for j in json.loads(args.jobs)]
  records = probe(jobs, args.repeats, args.warmup)
  print(MARKER + json.dumps(records), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
