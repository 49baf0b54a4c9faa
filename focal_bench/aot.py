"""``focal-bench aot``: what XLA compiles the losses' training step to on a TPU v5e or an H100,
without either device.

JAX compiles ahead of time for an accelerator that is not attached (a TPU topology from
libtpu; a CUDA target description for the GPU plugin), and the compiled program states its
temporary buffers (``memory_analysis``) and its estimated memory traffic (``cost_analysis``).
For each loss, dtype and shape this compiles one ``jit(grad(loss with reduction="mean"))`` step
at gamma 2, and optax's cross-entropy beside it, and reports the HBM bytes accessed and the
temporaries in units of the logits' size, against the floor (one read of the logits and one
write of the gradient: 2x; 3x when (N, C) targets are read too) and against optax.

On TPU the bytes judged are the HBM traffic read from the optimized program's layouts
(:func:`hbm_bytes`): XLA's ``bytes accessed`` (reported beside it) also counts the on-chip
memory, so where a step prefetches its logits into on-chip memory (at (4096, 1000), at C = 2)
it counts the prefetch and each later on-chip read as if they were HBM traffic. Where nothing
is prefetched the two agree (to 0.1 % at (2048, 30522)). On the H100 the bytes are XLA's
generic cost analysis of the optimized module plus the operands and results of its custom
calls (:func:`custom_call_bytes`; the cost analysis counts none of a Pallas kernel's bytes).

The floor is also compiled and measured: a step that reads the logits (and the targets) once
and writes one array of their shape (``z * 2``, ``z * y``). On a TPU its figure can exceed the
nominal 2x / 3x: arrays are stored in tiles of (8, 128) elements, so a (16384, 91) array
occupies (16384, 96) (3.16x for ``z * y``), and any program that touches it pays that. Targets
are set against the measured floor (the nominal one where it was not compiled). Every bytes
limit allows 64 bytes more for scalars (the mean's denominator): a step 24 bytes over 1.25x
optax is at 1.25x optax.

The figures are compile-time estimates, not timings: deterministic (good for budgets in tests)
but blind to caches, overlap and clock rates; XLA's cost model counts a custom call (cuBLAS,
a Pallas kernel) poorly, and a deviceless GPU compile has no autotuning.

The process that parses the command line never imports JAX: the compiles run in a subprocess
(``python -m focal_bench.aot --worker``) of an interpreter that has the target's plugin
(``--python``, default this one), with ``JAX_PLATFORMS=cpu``. TPU needs ``jax[tpu]`` (libtpu);
H100 needs ``jax[cuda12]`` and XLA's H100 target description (``--gpu-spec``).

Usage::

  focal-bench aot --target tpu --python /work/aot/tpu/bin/python --json tpu.json --md tpu.md
  focal-bench aot --target h100 --python /work/aot/cuda/bin/python --gpu-spec h100_sxm.txtpb
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable

GAMMA = 2.0
TARGETS = ("tpu", "h100")
LOSSES = ("softmax", "categorical", "sigmoid")
DTYPES = ("float32", "bfloat16")
# Issue 11's shapes: vocabularies (BERT, Llama 3), ImageNet, a detection head, 16 classes, binary.
SHAPES: tuple[tuple[int, int], ...] = ((2048, 30522), (2048, 128256), (4096, 1000), (16384, 91),
                                       (131072, 16), (65536, 2))
# linear_softmax_focal: (N x H) @ (H x V), bfloat16 (a Llama-3 head).
LINEAR_SHAPE: tuple[int, int, int] = (8192, 4096, 128256)
# Class counts from here up are judged against the floor, below it against optax.
LARGE_C = 1000
TEMP_LIMIT = 0.1  # temporaries, in units of the logits, for every loss
FLOOR_FACTOR = 1.5  # softmax / categorical at C >= LARGE_C: bytes <= 1.5x the floor
OPTAX_FACTOR = 1.25  # C < LARGE_C: bytes <= 1.25x optax's cross-entropy
# Slack on every floor-based limit for the per-row vectors (labels, loss, row statistics), which
# the floor (whole (N, C) arrays only) does not count: 2 % of the floor.
ROW_SLACK = 1.02
SIGMOID_FACTOR = ROW_SLACK  # sigmoid: at its floor
# Slack on every bytes limit for scalars (the mean's denominator, the loss): a step equal to
# 1.25x optax up to a few scalar reads is at 1.25x optax, not over it.
SCALAR_SLACK_BYTES = 64
LINEAR_TEMP_LIMIT = 0.125  # linear: temporaries beyond the kernel gradient, x the bf16 logits
TPU_TOPOLOGY = "v5e:2x2"
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_HERE = os.path.dirname(os.path.abspath(__file__))
_SPEC_CANDIDATES = (os.path.join(_HERE, "..", "..", "shared", "aot", "h100_sxm.txtpb"),
                    os.path.join(_HERE, "..", "shared", "aot", "h100_sxm.txtpb"))


@dataclasses.dataclass(frozen=True)
class Case:
  """One compiled step: ``impl`` "focal" (focal_jax) or "optax" (its cross-entropy).

  ``loss`` is softmax, categorical, sigmoid or linear; optax's peer of softmax and sigmoid is
  the cross-entropy with integer labels ("optax_int"), of categorical the one with probability
  targets ("optax_prob"); linear's is the cross-entropy of the materialized ``hidden @ kernel``.
  """

  loss: str
  impl: str
  n: int
  c: int
  dtype: str
  h: int = 0

  @property
  def key(self) -> str:
    shape = f"{self.n}x{self.h}x{self.c}" if self.h else f"{self.n}x{self.c}"
    return f"{self.loss}/{self.impl}/{shape}/{self.dtype}"

  @property
  def logits_bytes(self) -> int:
    return self.n * self.c * _ITEMSIZE[self.dtype]


def peer_of(loss: str) -> str:
  """The optax line a loss is compared with."""
  return {"softmax": "optax_int", "sigmoid": "optax_int", "categorical": "optax_prob",
          "linear": "optax_linear"}[loss]


def floor_x(loss: str) -> float:
  """The floor of the step's HBM traffic in units of the logits (targets in the logits' dtype)."""
  return 3.0 if loss in ("categorical", "sigmoid") else 2.0


def floor_case(loss: str, n: int, c: int, dtype: str) -> Case:
  """The program that measures ``loss``'s floor at a shape: ``floor2`` reads the logits and
  writes their shape (``z * 2``); ``floor3`` also reads (N, C) targets (``z * y``)."""
  return Case(f"floor{int(floor_x(loss))}", "floor", n, c, dtype)


def with_floors(cases: list[Case]) -> list[Case]:
  """``cases`` and, once per shape and dtype, the floor programs their focal lines need."""
  out, seen = list(cases), set()
  for c in cases:
    if c.impl == "focal" and c.loss in LOSSES:
      f = floor_case(c.loss, c.n, c.c, c.dtype)
      if f not in seen:
        seen.add(f)
        out.append(f)
  return out


def plan(losses: Iterable[str] = LOSSES, dtypes: Iterable[str] = DTYPES,
         shapes: Iterable[tuple[int, int]] = SHAPES, linear: bool = True,
         linear_shape: tuple[int, int, int] = LINEAR_SHAPE) -> list[Case]:
  """Every case to compile: each loss, dtype and shape, its optax peer once, and linear."""
  cases: list[Case] = []
  for n, c in shapes:
    for dtype in dtypes:
      for loss in losses:
        cases.append(Case(loss, "focal", n, c, dtype))
      peers = sorted({peer_of(loss) for loss in losses})
      for peer in peers:
        cases.append(Case(peer, "optax", n, c, dtype))
  if linear:
    n, h, v = linear_shape
    cases.append(Case("linear", "focal", n, v, "bfloat16", h=h))
    cases.append(Case("optax_linear", "optax", n, v, "bfloat16", h=h))
  return cases


# --- the worker: runs in the interpreter that has the target's plugin ------------------------

def _loss_fn(case: Case):
  import jax.numpy as jnp
  import optax
  import focal_jax
  if case.loss == "floor2":  # read once, write once (no gradient: the floor itself)
    return lambda z: z * 2
  if case.loss == "floor3":
    return lambda z, y: z * y
  if case.loss == "softmax":
    return lambda z, y: focal_jax.softmax_focal(z, y, gamma=GAMMA, reduction="mean")
  if case.loss == "categorical":
    return lambda z, y: focal_jax.categorical_focal(z, y, gamma=GAMMA, reduction="mean")
  if case.loss == "sigmoid":
    return lambda z, y: focal_jax.sigmoid_focal(z, y, gamma=GAMMA, reduction="mean")
  if case.loss == "optax_int":
    return lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  if case.loss == "optax_prob":
    return lambda z, y: optax.softmax_cross_entropy(z, y).mean()
  if case.loss == "linear":
    return lambda h, k, y: focal_jax.linear_softmax_focal(h, k, y, gamma=GAMMA,
                                                          reduction="mean")
  if case.loss == "optax_linear":
    return lambda h, k, y: optax.softmax_cross_entropy_with_integer_labels(
        jnp.dot(h, k, preferred_element_type=jnp.float32), y).mean()
  raise ValueError(f"focal-bench aot: unknown loss {case.loss!r}")


def _arg_specs(case: Case, sharding) -> tuple[tuple, tuple[int, ...]]:
  """Abstract arguments of the step and the argnums it differentiates."""
  import jax
  import jax.numpy as jnp
  dt = jnp.dtype(case.dtype)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  if case.loss in ("linear", "optax_linear"):
    return (spec((case.n, case.h), dt), spec((case.h, case.c), dt),
            spec((case.n,), jnp.int32)), (0, 1)
  z = spec((case.n, case.c), dt)
  if case.loss == "floor2":
    return (z,), ()
  if case.loss in ("softmax", "optax_int"):
    return (z, spec((case.n,), jnp.int32)), (0,)
  return (z, spec((case.n, case.c), dt)), (0,)  # (N, C) targets in the logits' dtype


_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32,
         "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.+?) ([a-z][\w-]*)\((.*?)\)(?:, |$)")
# Instructions that move no data themselves (views, tuples; the "-done" end of an async copy
# or slice, whose "-start" is counted).
_NO_TRAFFIC = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
                         "after-all", "partition-id", "replica-id"})


def _arrays(shape: str) -> list[tuple[int, bool]]:
  """(bytes as laid out, in HBM?) of each array in an HLO shape (a tuple gives several).

  A TPU layout ``{minor_to_major:T(a,b)...S(n)}`` pads the physical minor dimensions to the
  first tile, and ``S(n)`` with n >= 1 puts the array in an on-chip memory space, not HBM.
  """
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in _BITS:
      continue
    size = [int(d) for d in dims.split(",") if d]
    layout = layout or ""
    order = re.match(r"\{([0-9,]*)", layout)
    minor_to_major = [int(d) for d in order.group(1).split(",") if d] if order else []
    physical = ([size[d] for d in reversed(minor_to_major)]
                if sorted(minor_to_major) == list(range(len(size))) else list(size))
    tile = re.search(r"T\(([0-9,]+)\)", layout)
    if tile and physical:
      t = [int(d) for d in tile.group(1).split(",")]
      for k in range(1, min(len(t), len(physical)) + 1):
        physical[-k] = -(-physical[-k] // t[-k]) * t[-k]
    elems = 1
    for d in physical:
      elems *= d
    space = re.search(r"S\((\d+)\)", layout)
    out.append((elems * _BITS[dtype] // 8, not space or space.group(1) == "0"))
  return out


def _entry_instructions(hlo: str):
  """(opcode, result arrays, operand arrays) of each instruction of an optimized program's
  ENTRY computation, the arrays as :func:`_arrays` gives them."""
  shapes: dict[str, str] = {}
  in_entry = False
  for line in hlo.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if not in_entry:
      continue
    if line.startswith("}"):
      break
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, operands = m.groups()
    shapes[name] = shape
    yield opcode, _arrays(shape), [a for op in re.findall(r"%([\w.-]+)", operands)
                                   for a in _arrays(shapes.get(op, ""))]


def hbm_bytes(hlo: str) -> int:
  """HBM traffic of an optimized program's ENTRY computation, read from its layouts.

  Each instruction that moves data reads its operands and writes its result; only arrays in
  HBM count (an operand or result in an on-chip memory space, ``S(1)`` on TPU, does not), at
  their tiled size. An async ``copy-start`` counts its source and its destination (the first
  element of its result). XLA's ``bytes accessed`` counts every memory space: where a TPU
  program prefetches an array into on-chip memory it counts that copy and every later read of
  the copy, overstating HBM traffic. Async ``copy-start`` / ``slice-start`` count the bytes they
  move: the destination's size read from the source, and written if the destination is HBM.
  Instructions inside loops are not descended into (the losses' steps have none;
  linear_softmax_focal's scan is judged on temporaries only).
  """
  total = 0
  for opcode, results, sources in _entry_instructions(hlo):
    if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
      continue
    if opcode in ("copy-start", "slice-start"):
      # An async copy of (part of) its operand: the result tuple is (dest, source, context)
      # for a copy, ((source,), dest, context) for a slice. It reads the destination's worth
      # of the source and writes the destination.
      dest = results[0] if opcode == "copy-start" else results[1]
      total += dest[0] * (any(in_hbm for _, in_hbm in sources[:1]) + dest[1])
      continue
    total += sum(b for b, in_hbm in results + sources if in_hbm)
  return total


def custom_call_bytes(hlo: str) -> int:
  """The bytes of the operands and results of the ENTRY computation's custom calls (a Pallas
  kernel, a cuBLAS call), at their laid-out size.

  XLA's generic cost analysis, the H100's bytes, does not know what a custom call does and
  counts none of its bytes: a Triton kernel that reads the logits and writes the gradient
  would otherwise be free. Each custom call is taken to read each operand once and write each
  result once (a kernel that reads a row twice from HBM, not from its caches, moves more).
  """
  return sum(b for opcode, results, sources in _entry_instructions(hlo)
             if opcode == "custom-call" for b, _ in results + sources)


def _entry_big_buffers(hlo: str, case: Case) -> list[str]:
  """The ENTRY computation's instructions whose result is a logits-sized array or larger
  (each one is written to HBM): "name dtype[dims]"."""
  big = case.n * case.c
  out, in_entry = [], False
  for line in hlo.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if in_entry and line.startswith("}"):
      break
    if not in_entry:
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) [\w\-]+\(", line)
    if not m:
      continue
    for dt, dims in re.findall(r"([a-z]+\d*)\[([\d,]+)\]", m.group(2)):
      size = 1
      for d in dims.split(","):
        size *= int(d)
      if size >= big:
        out.append(f"{m.group(1)} {dt}[{dims}]")
  return out


def _topology(target: str, gpu_spec: str | None):
  """The compile target's sharding for one device, and a description of it."""
  import numpy as np
  import jax
  from jax.experimental import topologies
  if target == "tpu":
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    topo = topologies.get_topology_desc(platform="tpu", topology_name=TPU_TOPOLOGY)
    dev = topo.devices[0]
    return NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec()), {
        "platform": "tpu", "topology": TPU_TOPOLOGY, "device_kind": dev.device_kind}
  with open(gpu_spec) as f:
    spec = f.read()
  topo = topologies.get_topology_desc(platform="cuda", target_config=spec, topology="1x1x1")
  dev = topo.devices[0]
  return jax.sharding.SingleDeviceSharding(dev), {
      "platform": "cuda", "target_config": os.path.basename(gpu_spec),
      "device_kind": getattr(dev, "device_kind", "")}


def _bytes_accessed(target: str, compiled) -> float:
  if target == "tpu":
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    # Absent where every instruction that moves data is a custom call (a step that is one
    # Pallas kernel): XLA knows no bytes of it. hbm_bytes, which the TPU is judged on, does.
    return float(cost.get("bytes accessed", 0.0))
  # A deviceless GPU compile has no cost analysis: XLA's generic one on the optimized module.
  from jax._src import xla_bridge as xb
  from jax._src.lib import _jax
  module = compiled.runtime_executable().hlo_modules()[0]
  return float(_jax.hlo_module_cost_analysis(xb.get_backend("cpu"), module)["bytes accessed"])


def compile_case(case: Case, target: str, sharding, with_hlo: bool = False) -> dict[str, Any]:
  """Compile one case for ``target``; its byte and memory figures (the worker's record)."""
  import jax
  args, argnums = _arg_specs(case, sharding)
  if case.impl == "floor":
    step = jax.jit(_loss_fn(case))
  else:
    step = jax.jit(jax.grad(_loss_fn(case), argnums=argnums))
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  rec = {
      "key": case.key, "case": dataclasses.asdict(case),
      "compile_s": round(time.perf_counter() - t0, 2),
      "bytes_accessed": _bytes_accessed(target, compiled),
      # Not for the linear head: its scan's loop body is not read (judged on temporaries).
      **({"hbm_bytes": hbm_bytes(hlo)} if target == "tpu" and not case.h else {}),
      # What the H100's cost analysis leaves out (TPU: in hbm_bytes).
      **({"custom_call_bytes": custom_call_bytes(hlo)} if target != "tpu" else {}),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "logits_bytes": case.logits_bytes,
      "big_buffers": _entry_big_buffers(hlo, case),
  }
  if with_hlo:
    rec["hlo"] = hlo
  return rec


def versions(target: str) -> dict[str, str | None]:
  import importlib.metadata as md
  names = ["jax", "jaxlib", "optax", "focal-losses"] + (
      ["libtpu", "libtpu-nightly"] if target == "tpu" else
      ["jax-cuda12-plugin", "jax-cuda12-pjrt"])
  out = {}
  for name in names:
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      if name != "libtpu-nightly":
        out[name] = None
  return out


def worker(target: str, cases: list[Case], gpu_spec: str | None, out=sys.stdout) -> None:
  """Compile each case; one JSON line each (errors included), after a header line."""
  sharding, device = _topology(target, gpu_spec)
  print(json.dumps({"header": True, "target": target, "device": device,
                    "versions": versions(target)}), file=out, flush=True)
  for case in cases:
    try:
      rec = compile_case(case, target, sharding)
    except Exception as e:  # one failing compile must not lose the others
      rec = {"key": case.key, "case": dataclasses.asdict(case),
             "error": f"{type(e).__name__}: {e}"[:1000]}
    print(json.dumps(rec), file=out, flush=True)


# --- the parent: runs the worker, judges, writes tables --------------------------------------

def find_gpu_spec(path: str | None) -> str | None:
  """``path``, else $FOCAL_AOT_GPU_SPEC, else an ``h100_sxm.txtpb`` in ``shared/aot``."""
  for p in (path, os.environ.get("FOCAL_AOT_GPU_SPEC"), *_SPEC_CANDIDATES):
    if p and os.path.exists(p):
      return os.path.abspath(p)
  return None


def worker_env() -> dict[str, str]:
  env = dict(os.environ)
  # libtpu and the CUDA plugin make JAX probe for their device when it starts; the compiles
  # need no device: JAX runs on the CPU and compiles for the topology.
  env["JAX_PLATFORMS"] = "cpu"
  env["TPU_SKIP_MDS_QUERY"] = "1"
  # libtpu takes a lock file (/tmp/libtpu_lockfile) per process that loads it; compiles need
  # no TPU, so two compiling processes (the benchmark and a test) may share the machine.
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  root = os.path.dirname(_HERE)
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def run_worker(target: str, cases: list[Case], python: str | None = None,
               gpu_spec: str | None = None, timeout_s: float = 3600,
               log=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Compile ``cases`` for ``target`` in a subprocess; (header, records)."""
  cmd = [python or sys.executable, "-m", "focal_bench.aot", "--worker", "--target", target]
  if gpu_spec:
    cmd += ["--gpu-spec", gpu_spec]
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                            text=True, env=worker_env())
    proc.stdin.write(json.dumps([dataclasses.asdict(c) for c in cases]))
    proc.stdin.close()
    header, records = None, []
    deadline = time.time() + timeout_s
    for line in proc.stdout:  # one record per compile, as it finishes
      if time.time() > deadline:
        proc.kill()
        break
      if not line.startswith("{"):
        continue
      rec = json.loads(line)
      if rec.get("header"):
        header = rec
        continue
      records.append(rec)
      if log is not None:
        print(f"  {rec['key']}: " + (rec.get("error") or f"{rec['compile_s']} s"), file=log,
              flush=True)
    proc.wait()
    err.seek(0)
    stderr = err.read()
  if header is None or proc.returncode != 0:
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"focal-bench aot: the {target} worker failed (exit {proc.returncode})"
                       f":\n{tail}")
  return header, records


def _traffic(rec: dict[str, Any]) -> float:
  """The bytes a record is judged on: HBM traffic from the layouts where the worker read it
  (TPU: :func:`hbm_bytes`), else XLA's bytes accessed and its custom calls' operands and
  results (:func:`custom_call_bytes`)."""
  if "hbm_bytes" in rec:
    return float(rec["hbm_bytes"])
  return float(rec["bytes_accessed"]) + rec.get("custom_call_bytes", 0)


def judge(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per focal case: ratios to the logits, the floor and optax, the target and verdict."""
  idx = {r["key"]: r for r in records}
  rows = []
  for r in records:
    c = Case(**r["case"])
    if c.impl != "focal":
      continue
    row: dict[str, Any] = {"key": c.key, "loss": c.loss, "n": c.n, "c": c.c, "h": c.h,
                           "dtype": c.dtype}
    peer = idx.get(Case(peer_of(c.loss), "optax", c.n, c.c, c.dtype, c.h).key)
    if peer is not None and "error" not in peer:
      row["optax_bytes_x"] = _traffic(peer) / peer["logits_bytes"]
      row["optax_temp_x"] = peer["temp_bytes"] / peer["logits_bytes"]
    if "error" in r:
      row.update(error=r["error"], verdict="error")
      rows.append(row)
      continue
    lb = r["logits_bytes"]
    row["bytes_x"] = _traffic(r) / lb
    row["bytes_accessed_x"] = r["bytes_accessed"] / lb
    row["temp_x"] = r["temp_bytes"] / lb
    row["big_buffers"] = r["big_buffers"]
    if c.loss == "linear":
      # The kernel gradient in float32 (an accumulator over row chunks) is not counted.
      kernel_grad = c.h * c.c * 4
      row["temp_beyond_kernel_grad_x"] = max(0, r["temp_bytes"] - kernel_grad) / lb
      row["target"] = f"temp beyond the f32 kernel gradient <= {LINEAR_TEMP_LIMIT}x"
      row["held"] = row["temp_beyond_kernel_grad_x"] <= LINEAR_TEMP_LIMIT
    else:
      fl = row["floor_nominal_x"] = floor_x(c.loss)
      floor = idx.get(floor_case(c.loss, c.n, c.c, c.dtype).key)
      if floor is not None and "error" not in floor:
        fl = _traffic(floor) / floor["logits_bytes"]  # the measured floor
      row["floor_x"] = fl
      row["bytes_x_floor"] = row["bytes_x"] / fl
      if "optax_bytes_x" in row:
        row["bytes_x_optax"] = row["bytes_x"] / row["optax_bytes_x"]
      if c.loss == "sigmoid":
        limit = fl * SIGMOID_FACTOR
        row["target"] = f"bytes <= {limit:.2f}x (floor {fl:.2f}x + per-row)"
      elif c.c >= LARGE_C:
        limit = fl * FLOOR_FACTOR * ROW_SLACK
        row["target"] = f"bytes <= {limit:.2f}x ({FLOOR_FACTOR}x floor {fl:.2f}x + per-row)"
      elif "optax_bytes_x" in row:
        limit = OPTAX_FACTOR * row["optax_bytes_x"]
        row["target"] = f"bytes <= {limit:.2f}x ({OPTAX_FACTOR}x optax)"
      else:
        limit, row["target"] = float("nan"), "optax missing"
      row["target"] += f", temp <= {TEMP_LIMIT}x"
      row["bytes_limit_x"] = limit
      row["held"] = bool(row["bytes_x"] <= limit + SCALAR_SLACK_BYTES / lb
                         and row["temp_x"] <= TEMP_LIMIT)
    row["verdict"] = "held" if row["held"] else "MISSED"
    rows.append(row)
  return rows


def _shape(row: dict[str, Any]) -> str:
  if row["loss"] == "linear":
    return f"({row['n']}x{row['h']})@({row['h']}x{row['c']})"
  return f"{row['n']}x{row['c']}"


def _x(v: Any, digits: int = 2) -> str:
  return "—" if v is None else f"{v:.{digits}f}x"


def markdown(doc: dict[str, Any]) -> str:
  """The table of one target's run, with its device and versions."""
  h = doc["header"]
  v = ", ".join(f"{k} {val}" for k, val in h["versions"].items() if val)
  dev = h["device"]
  lines = [
      f"**{doc['target']}** ({dev.get('device_kind') or dev['platform']}, "
      f"{dev.get('topology') or dev.get('target_config')}; {v})", "",
      "| loss | shape | dtype | bytes / logits | XLA bytes accessed | temp / logits | floor | "
      "bytes / floor | optax bytes (temp) | bytes / optax | target | verdict |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    if r.get("error"):
      lines.append(f"| {r['loss']} | {_shape(r)} | {r['dtype']} | error: {r['error'][:80]} "
                   f"| | | | | | | | error |")
      continue
    optax = ("—" if "optax_bytes_x" not in r else
             f"{r['optax_bytes_x']:.2f}x ({r['optax_temp_x']:.2f}x)")
    temp = _x(r["temp_x"])
    if r["loss"] == "linear":
      temp += f" ({r['temp_beyond_kernel_grad_x']:.2f}x beyond the f32 kernel gradient)"
    lines.append(
        f"| {r['loss']} | {_shape(r)} | {r['dtype']} | {_x(r['bytes_x'])} | "
        f"{_x(r.get('bytes_accessed_x'))} | {temp} | "
        f"{_x(r.get('floor_x'))} | {_x(r.get('bytes_x_floor'))} | {optax} | "
        f"{_x(r.get('bytes_x_optax'))} | {r['target']} | {r['verdict']} |")
  held = sum(1 for r in doc["rows"] if r.get("held"))
  lines += ["", f"{held} of {len(doc['rows'])} targets held."]
  return "\n".join(lines)


def measure(target: str, cases: list[Case], python: str | None = None,
            gpu_spec: str | None = None, log=None) -> dict[str, Any]:
  """Compile every case for ``target`` and judge it; the JSON document of the run."""
  if target == "h100":
    gpu_spec = find_gpu_spec(gpu_spec)
    if gpu_spec is None:
      raise SystemExit("focal-bench aot: --target h100 needs XLA's H100 target description "
                       "(--gpu-spec PATH or $FOCAL_AOT_GPU_SPEC; see BENCHMARKS.md)")
  started = time.time()
  header, records = run_worker(target, with_floors(cases), python, gpu_spec, log=log)
  return {"schema": "focal-bench-aot/1", "target": target, "header": header,
          "gamma": GAMMA, "elapsed_s": round(time.time() - started, 1),
          "records": records, "rows": judge(records)}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="focal-bench aot", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--target", choices=TARGETS, action="append",
                 help="compile for a TPU v5e (libtpu) or an H100 (CUDA plugin); repeatable "
                      "(default: tpu)")
  p.add_argument("--python", action="append", metavar="[TARGET=]PATH",
                 help="the interpreter that has the target's plugin (jax[tpu] / jax[cuda12]); "
                      "TARGET= when several targets run (default: this interpreter)")
  p.add_argument("--gpu-spec", help="XLA's H100 target description (.txtpb; default "
                 "$FOCAL_AOT_GPU_SPEC or shared/aot/h100_sxm.txtpb beside the checkout)")
  p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
  p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
  p.add_argument("--shapes", nargs="+", metavar="NxC",
                 default=[f"{n}x{c}" for n, c in SHAPES])
  p.add_argument("--no-linear", action="store_true",
                 help="leave out linear_softmax_focal at (8192x4096)@(4096x128256) bf16")
  p.add_argument("--json", metavar="PATH", help="write the records and rows here")
  p.add_argument("--md", metavar="PATH", help="write the Markdown tables here")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  return p


def _pythons(values: list[str] | None) -> dict[str | None, str]:
  out: dict[str | None, str] = {}
  for v in values or ():
    name, sep, path = v.partition("=")
    if sep and name in TARGETS:
      out[name] = path
    else:
      out[None] = v
  return out


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  targets = args.target or ["tpu"]
  if args.worker:
    cases = [Case(**c) for c in json.loads(sys.stdin.read())]
    worker(targets[0], cases, args.gpu_spec)
    return 0
  shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes]
  cases = plan(args.losses, args.dtypes, shapes, linear=not args.no_linear)
  pythons = _pythons(args.python)
  docs, texts = [], []
  for target in targets:
    print(f"focal-bench aot: compiling {len(cases)} steps for {target}", file=sys.stderr,
          flush=True)
    doc = measure(target, cases, pythons.get(target, pythons.get(None)), args.gpu_spec,
                  log=sys.stderr)
    doc["command"] = "focal-bench aot " + " ".join(argv if argv is not None else sys.argv[1:])
    docs.append(doc)
    texts.append(markdown(doc))
    print(texts[-1] + "\n", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(docs[0] if len(docs) == 1 else docs, f, indent=1)
  if args.md:
    with open(args.md, "w") as f:
      f.write("\n\n".join(texts) + "\n")
  return 1 if any(r.get("error") for d in docs for r in d["records"]) else 0


if __name__ == "__main__":
  raise SystemExit(main())
