"""``focal-bench``: focal_jax and focal_torch against their peers, side by side in one process.

Times one forward + backward step (float32, gamma 2, reduction mean, gradient with respect to
the logits) of every implementation over a sweep of class counts C = 2 .. 131072 (N * C held
near a budget) and at the shapes named by docs/design.md's targets, interleaving the
implementations round by round; then measures each one's extra peak memory in fresh
subprocesses (see ``focal_bench.memory``). Prints the machine, Markdown tables, the ratios and
the targets; writes JSON (``--json``) and PNG plots plus ``report.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from typing import Any

from focal_bench import machine, memory, plots, problems, registry, report, timing

_PREPARE = {}
# Subcommands, each its own module with a main(argv): `focal-bench aot --target tpu|h100`
# (compiled HBM bytes and temporaries for accelerators, no device needed) and `focal-bench gpu`
# (the prepared run for a machine with a GPU; `--dry` on CPU).
_SUBCOMMANDS = {"aot": "focal_bench.aot", "gpu": "focal_bench.gpu_check"}


def _prepare(framework: str):
  if not _PREPARE:
    from focal_bench import impls_jax, impls_torch
    _PREPARE.update(jax=impls_jax.prepare, torch=impls_torch.prepare)
  return _PREPARE[framework]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="focal-bench", description=__doc__.split("\n\n")[0],
      epilog="subcommands: 'focal-bench aot --target tpu|h100' (compiled HBM bytes and "
             "temporaries for a TPU v5e or an H100, no device needed) and 'focal-bench gpu' "
             "(the prepared GPU run; --dry on CPU); each has its own --help",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="tiny sweep, few repetitions, all modes, no torch.compile (a smoke run)")
  p.add_argument("--linear", action="store_true",
                 help="run only the linear mode: linear_softmax_focal against the materialized "
                      "path at (4096x512)@(512x32768)")
  p.add_argument("--linear-shape", metavar="NxHxV",
                 help="the linear mode's (N x H) @ (H x V) shape (default 4096x512x32768; "
                      "issue 6's GPU shape: 8192x4096x128256 with --dtype bfloat16)")
  p.add_argument("--modes", nargs="+", choices=("softmax", "sigmoid", "categorical", "linear"),
                 help="modes to run (default: softmax sigmoid; --quick: all four). categorical: "
                      "probability targets (one-hot smoothed by 0.1) against the probability "
                      "cross-entropy of optax and F.cross_entropy")
  p.add_argument("--frameworks", nargs="+", choices=("jax", "torch"), default=["jax", "torch"])
  p.add_argument("--only", nargs="+", default=[], metavar="KEY",
                 help="run only these implementation keys (see --list)")
  p.add_argument("--list", action="store_true", help="list the implementations and exit")
  p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                 help="include torch.compile variants (default: yes, but no with --quick)")
  p.add_argument("--classes", type=int, nargs="+", help="class counts of the sweep")
  p.add_argument("--shapes", nargs="+", metavar="NxC",
                 help="run exactly these (N, C) shapes instead of the sweep, e.g. 2048x30522")
  p.add_argument("--budget", type=int, help="N * C of the sweep (default 2**24; quick 2**20)")
  p.add_argument("--max-elements", type=int, default=2**26,
                 help="leave out shapes whose logits have more elements than this")
  p.add_argument("--no-targets", action="store_true", help="leave out the target shapes")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--min-reps", type=int, help="timed calls per implementation, at least "
                 "(default 7; quick 3)")
  p.add_argument("--max-reps", type=int, help="timed calls, at most (default 30; quick 5)")
  p.add_argument("--time-budget", type=float,
                 help="seconds of timed rounds per shape (default 4; quick 0.3)")
  p.add_argument("--warmup", type=int, help="untimed calls before timing (default 2; quick 1)")
  p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
  p.add_argument("--memory-isolation", choices=("impl", "framework"),
                 help="one probe process per implementation, or one per framework "
                      "(default impl; quick framework)")
  p.add_argument("--memory-repeats", type=int, default=3, help="measured steps per probe")
  p.add_argument("--json", metavar="PATH", help="write all records as JSON here")
  p.add_argument("--out", metavar="DIR", help="write PNG plots and report.md here")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--label", default="", help="free text recorded with the run (e.g. the commit "
                 "of a clean checkout)")
  return p


def _linear_shape(text: str) -> tuple[int, int, int]:
  try:
    n, h, v = (int(d) for d in text.lower().split("x"))
  except ValueError:
    raise SystemExit(f"focal-bench: --linear-shape must be NxHxV (three positive integers, "
                     f"e.g. 4096x512x32768), got {text!r}") from None
  if min(n, h, v) < 1:
    raise SystemExit(
        f"focal-bench: --linear-shape must be NxHxV with positive sizes, got {text!r}")
  return n, h, v


def _settings(args: argparse.Namespace) -> dict[str, Any]:
  q = args.quick
  modes = args.modes or (["linear"] if args.linear else
                         (["softmax", "sigmoid", "categorical", "linear"] if q else
                          ["softmax", "sigmoid"]))
  return {
      "modes": modes,
      "frameworks": tuple(args.frameworks),
      "compile": (not q) if args.compile is None else args.compile,
      "classes": tuple(args.classes or (problems.QUICK_CLASSES if q else problems.SWEEP_CLASSES)),
      "budget": args.budget or (2**20 if q else 2**24),
      "max_elements": args.max_elements,
      "targets": not (args.no_targets or q),
      "dtype": args.dtype,
      "min_reps": args.min_reps or (3 if q else 7),
      "max_reps": args.max_reps or (5 if q else 30),
      "time_budget": args.time_budget if args.time_budget is not None else (0.3 if q else 4.0),
      "warmup": max(1, args.warmup or (1 if q else 2)),
      "memory": not args.no_memory,
      "memory_isolation": args.memory_isolation or ("framework" if q else "impl"),
      "memory_repeats": max(1, args.memory_repeats),
      "linear_shape": (_linear_shape(args.linear_shape) if args.linear_shape else
                       problems.QUICK_LINEAR_SHAPE if q else problems.LINEAR_SHAPE),
      "shapes": [tuple(int(d) for d in shape.lower().split("x")) for shape in args.shapes or ()],
  }


def _problems(mode: str, s: dict[str, Any]) -> list[problems.Problem]:
  if mode == "linear":
    n, h, v = s["linear_shape"]
    return [problems.Problem("linear", n, v, h=h, dtype=s["dtype"], target=True)]
  if s["shapes"]:
    return [problems.Problem(mode, n, c, dtype=s["dtype"],
                             target=(n, c) in problems.TARGET_SHAPES) for n, c in s["shapes"]]
  return problems.sweep(mode, s["classes"], s["budget"], s["max_elements"], s["targets"],
                        s["dtype"])


def _record(problem: problems.Problem, impl: registry.Impl) -> dict[str, Any]:
  return {"problem": problem.as_dict(), "impl": impl.key, "name": impl.name,
          "framework": impl.framework, "role": impl.role, "compiled": impl.compiled,
          "ref": impl.ref, "vs_deepspeed": impl.vs_deepspeed, "note": impl.note}


def _failure(e: BaseException) -> dict[str, Any]:
  if isinstance(e, registry.Unavailable):
    return {"status": "unavailable", "reason": str(e)}
  return {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}


def _time_problem(problem: problems.Problem, impls: list[registry.Impl], s: dict[str, Any],
                  bar) -> list[dict[str, Any]]:
  """Build, warm up and time every implementation at one shape; one record each."""
  data = problems.make_data(problem)
  inputs: dict[str, Any] = {}
  records, runners, estimates = {}, {}, {}
  for impl in impls:
    rec = records[impl.key] = _record(problem, impl)
    if bar is not None:
      bar.set_postfix_str(f"{problem.mode} {problem.label}: warm-up {impl.key}")
    try:
      if impl.framework not in inputs:
        inputs[impl.framework] = _prepare(impl.framework)(problem, data)
      runner = impl.build(problem, inputs[impl.framework])
      t0 = time.perf_counter()
      estimates[impl.key] = timing.warm_up(runner, s["warmup"])
      rec["warmup_s"] = time.perf_counter() - t0
      runners[impl.key] = runner
    except Exception as e:  # a failing implementation must not stop the others
      rec["time"] = _failure(e)
  if bar is not None:
    bar.set_postfix_str(f"{problem.mode} {problem.label}: timing {len(runners)} implementations")
  # One group of interleaved rounds per framework, one group after the other: between calls
  # the idle worker threads of torch (OpenMP) and of XLA:CPU spin for a while before they
  # sleep, so on a machine with few cores a JAX call right after a torch call (or the reverse)
  # shares its cores with the other's spinning threads. At (16384, 91) on 2 cores that doubled
  # the JAX step times in mixed rounds (optax 1.45 -> 3.03 ms, focal_jax 1.52 -> 4.41 ms).
  groups: dict[str, dict[str, Any]] = {}
  for impl in impls:
    if impl.key in runners:
      groups.setdefault(impl.framework, {})[impl.key] = runners[impl.key]
  samples, faults = {}, {}
  for group in groups.values():
    got = timing.time_interleaved(group, estimates, min_reps=s["min_reps"],
                                  max_reps=s["max_reps"],
                                  budget_s=s["time_budget"] / len(groups))
    samples.update(got[0])
    faults.update(got[1])
  for key, ts in samples.items():
    fs = sorted(faults[key])
    records[key]["time"] = {"status": "ok", **timing.summarize(ts), "samples": ts,
                            "minor_faults_median": fs[len(fs) // 2]}
  del runners, inputs, data
  gc.collect()
  return list(records.values())


def _memory_groups(recs: list[dict[str, Any]], isolation: str, jax_per_problem: bool
                   ) -> list[list[tuple[problems.Problem, list[str]]]]:
  """Group the (problem, impl) pairs into probe processes.

  ``jax_per_problem``: a JAX accelerator's peak cannot be reset, so each JAX (impl, problem)
  pair gets a process of its own.
  """
  impls = registry.by_key()
  groups: dict[tuple, list[tuple[problems.Problem, list[str]]]] = {}
  for r in recs:
    if (r.get("time") or {}).get("status") not in ("ok", None):
      continue  # it did not run; its time record says why
    p = problems.Problem(**r["problem"])
    impl = impls[r["impl"]]
    gkey = (impl.key,) if isolation == "impl" else (impl.framework,)
    if jax_per_problem and impl.framework == "jax":
      gkey = (impl.key, report.problem_key(r["problem"]))
    jobs = groups.setdefault(gkey, [])
    if jobs and jobs[-1][0] == p:
      jobs[-1][1].append(impl.key)
    else:
      jobs.append((p, [impl.key]))
  return list(groups.values())


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in _SUBCOMMANDS:  # focal-bench aot ... / focal-bench gpu ...
    import importlib
    return importlib.import_module(_SUBCOMMANDS[argv[0]]).main(argv[1:])
  args = _parser().parse_args(argv)
  if args.list:
    for impl in registry.all_impls():
      print(f"{impl.key:32s} {impl.mode:8s} {impl.framework:6s} {impl.role:10s} {impl.name}")
    return 0
  s = _settings(args)
  info = machine.describe(s["frameworks"])
  machine_text = machine.summary(info)
  print("focal-bench on", machine_text.replace("\n", "\n  "), flush=True)

  from tqdm import tqdm
  plan = []
  for mode in s["modes"]:
    impls = registry.select(mode, s["frameworks"], s["compile"], tuple(args.only))
    if not impls:  # e.g. --only naming implementations of other modes
      continue
    for problem in _problems(mode, s):
      plan.append((problem, impls))
  total = sum(len(impls) for _, impls in plan)
  bar = None if args.no_progress else tqdm(total=total * (2 if s["memory"] else 1),
                                           desc="focal-bench", unit="run", file=sys.stderr)
  started = time.time()
  records: list[dict[str, Any]] = []
  for problem, impls in plan:
    records.extend(_time_problem(problem, impls, s, bar))
    if bar is not None:
      bar.update(len(impls))

  phases = {"timing_s": round(time.time() - started, 1)}
  if s["memory"]:
    groups = _memory_groups(records, s["memory_isolation"],
                            jax_per_problem=info.get("jax_backend", "cpu") != "cpu")
    skipped = total - sum(len(keys) for g in groups for _, keys in g)
    if bar is not None:
      bar.update(skipped)
      bar.set_postfix_str(f"memory: {len(groups)} probe processes")
    mem = memory.run_probes(groups, s["memory_repeats"], s["warmup"], timeout_s=1800,
                            on_done=(bar.update if bar is not None else None))
    by = {(report.problem_key(m["problem"]), m["impl"]): m for m in mem}
    for r in records:
      m = by.get((report.problem_key(r["problem"]), r["impl"]))
      if m is not None:
        r["memory"] = {k: v for k, v in m.items() if k not in ("problem", "impl")}
    phases["memory_s"] = round(time.time() - started - phases["timing_s"], 1)
  if bar is not None:
    bar.close()

  report.add_ratios(records)
  accelerator = (info.get("jax_backend", "cpu") != "cpu" or
                 info.get("torch_device", "cpu") != "cpu")
  checks = report.targets(records, accelerator=accelerator)
  doc = {
      "schema": "focal-bench/1",
      "command": "focal-bench " + shlex.join(argv),
      "label": args.label,
      "machine": info,
      "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
      "elapsed_s": round(time.time() - started, 1),
      "phases": phases,
      "load_average_end": machine.load_average(),
      "results": records,
      "targets": checks,
  }
  text = report.markdown(doc, machine_text)
  print(text, flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(doc, f, indent=1)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    for mode in s["modes"]:
      plots.plot_mode(records, mode, args.out)
    with open(os.path.join(args.out, "report.md"), "w") as f:
      f.write(text + "\n")
  failed = [r for r in records if r["role"] != registry.PROJECT and
            any((r.get(k) or {}).get("status") == "error" for k in ("time", "memory"))]
  return 1 if failed else 0
