"""Where the time of one forward + backward step goes: XLA's optimized HLO (JAX) and the
torch profiler's operator table (torch).

``python -m focal_bench.profile --n 2048 --c 30522`` prints, for each JAX implementation, the
top-level (ENTRY) instructions of the compiled step that read or write an array of the
logits' shape, i.e. the passes over (N, C) memory that XLA did not fuse away; and for each
torch implementation the operators by self CPU time. A fused focal gradient needs one read of
the logits per reduction it cannot share plus one write of the gradient.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from focal_bench.problems import Problem, make_data
from focal_bench.registry import by_key

_SKIP_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_DEF = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\])\S*\s+"
                  r"([a-z\-]+)\((.*?)\)")


def entry_traffic(hlo_text: str, shape: tuple[int, ...]) -> dict[str, Any]:
  """Count the ENTRY instructions of ``hlo_text`` that read / write arrays of ``shape``.

  Returns ``{"reads": int, "writes": int, "instructions": [(name, opcode, reads, writes)]}``;
  a fusion that reads the logits twice counts twice (once per operand of that shape). A gather
  touches one element per row, not the whole array: it is listed but not counted as a read.
  """
  dims = ",".join(str(d) for d in shape)
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  shapes: dict[str, str] = {}
  rows = []
  for line in entry.splitlines()[1:]:
    m = _DEF.match(line)
    if not m:
      continue
    name, out_shape, opcode, operands = m.groups()
    shapes[name] = out_shape
    if opcode in _SKIP_OPS:
      continue
    ops = re.findall(r"%[\w.\-]+", operands)
    reads = sum(1 for o in ops if re.search(rf"\[{dims}\]", shapes.get(o, "")))
    writes = len(re.findall(rf"\[{dims}\]", out_shape))
    if reads or writes:
      kind = re.search(r"kind=(\w+)", line)
      rows.append((name, opcode + (f"/{kind.group(1)}" if kind else ""), reads, writes))
  full = [r for r in rows if "gather" not in r[0]]
  return {"reads": sum(r[2] for r in full), "writes": sum(r[3] for r in full),
          "instructions": rows}


def jax_step_hlo(key: str, problem: Problem) -> str:
  """The optimized HLO text of the jitted step of JAX implementation ``key``."""
  from focal_bench import impls_jax
  runner = by_key()[key].build(problem, impls_jax.prepare(problem, make_data(problem)))
  step, args = runner.jitted
  return step.lower(*args).compile().as_text()


def torch_op_table(key: str, problem: Problem, rows: int = 12) -> str:
  """The torch profiler's operator table (self CPU time) of two steps of ``key``."""
  import torch.profiler
  from focal_bench import impls_torch
  from focal_bench.timing import warm_up
  impl = by_key()[key]
  runner = impl.build(problem, impls_torch.prepare(problem, make_data(problem)))
  warm_up(runner, 2)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(2):
      runner.run()
  return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mode", default="softmax", choices=("softmax", "sigmoid", "categorical"))
  p.add_argument("--n", type=int, default=2048)
  p.add_argument("--c", type=int, default=30522)
  p.add_argument("--impls", nargs="+", default=["jax_focal", "jax_optax_ce", "torch_focal",
                                                "torch_ce", "torch_deepspeed"])
  p.add_argument("--hlo", action="store_true", help="also print the ENTRY computations")
  args = p.parse_args(argv)
  problem = Problem(args.mode, args.n, args.c)
  for key in args.impls:
    impl = by_key()[key]
    print(f"== {key}: {impl.name} at {problem.label}")
    if impl.framework == "jax":
      text = jax_step_hlo(key, problem)
      t = entry_traffic(text, (problem.n, problem.c))
      print(f"(N, C) arrays: {t['reads']} full reads, {t['writes']} writes in ENTRY "
            "(gathers listed, not counted)")
      for name, op, r, w in t["instructions"]:
        print(f"  {name:40s} {op:24s} reads {r} writes {w}")
      if args.hlo:
        print(text[text.index("\nENTRY"):])
    else:
      print(torch_op_table(key, problem))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
