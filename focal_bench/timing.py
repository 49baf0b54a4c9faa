"""Wall-clock timing of several runners side by side, interleaved round by round."""

from __future__ import annotations

import gc
import math
import resource
import time
from typing import Callable

from focal_bench.registry import Runner


def warm_up(runner: Runner, calls: int) -> float:
  """Call ``runner`` ``calls`` times (compilation happens in the first); the last call's time."""
  last = math.inf
  for _ in range(calls):
    if runner.setup is not None:
      runner.setup()
    t0 = time.perf_counter()
    runner.run()
    last = time.perf_counter() - t0
  return last


def time_interleaved(runners: dict[str, Runner], estimates: dict[str, float], *,
                     min_reps: int, max_reps: int, budget_s: float,
                     on_round: Callable[[int, int], None] | None = None
                     ) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
  """Time every runner ``reps`` times, one call of each per round, in a rotating order.

  Interleaving spreads slow drifts of the machine (other processes, thermal state) over all
  implementations alike instead of charging them to whichever ran last. ``reps`` is chosen so
  the rounds take about ``budget_s`` seconds, within ``[min_reps, max_reps]``. ``setup`` runs
  before its call, outside the timed region. Garbage collection is off during a call; the
  objects alive before the first round are frozen (``gc.freeze``) until the last.

  Returns the seconds of each call and the minor page faults of the process during each call
  (first touches of freshly mapped memory: a fresh output buffer faults once per page).
  """
  keys = list(runners)
  if not keys:  # every implementation failed to build: nothing to time
    return {}, {}
  per_round = sum(estimates.get(k, 0.0) for k in keys)
  reps = min_reps if per_round <= 0 else int(budget_s / per_round)
  reps = max(min_reps, min(max_reps, reps))
  samples: dict[str, list[float]] = {k: [] for k in keys}
  faults: dict[str, list[int]] = {k: [] for k in keys}
  gc_was_enabled = gc.isenabled()
  # What lives now (modules, runners, inputs) is set aside, so the collection before each call
  # scans only what the calls made, not every object of jax and torch.
  gc.collect()
  gc.freeze()
  try:
    for r in range(reps):
      order = keys[r % len(keys):] + keys[:r % len(keys)]
      for k in order:
        runner = runners[k]
        if runner.setup is not None:
          runner.setup()
        gc.collect()
        gc.disable()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        runner.run()
        samples[k].append(time.perf_counter() - t0)
        faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        if gc_was_enabled:
          gc.enable()
      if on_round is not None:
        on_round(r + 1, reps)
  finally:
    gc.unfreeze()
    if gc_was_enabled:
      gc.enable()
  return samples, faults


def summarize(samples: list[float]) -> dict[str, float | int]:
  """Median, min and max of ``samples`` (seconds) and their count."""
  s = sorted(samples)
  n = len(s)
  median = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
  return {"median": median, "min": s[0], "max": s[-1], "reps": n}
