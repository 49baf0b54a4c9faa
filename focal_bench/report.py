"""Ratios, target checks and Markdown tables from the benchmark records."""

from __future__ import annotations

from typing import Any

from focal_bench.problems import TARGET_SHAPES, Problem
from focal_bench.registry import PROJECT

DEEPSPEED_KEY = "torch_deepspeed"
FLOOR_KEYS = {"jax": "jax_copy", "torch": "torch_copy"}


def problem_key(p: dict[str, Any]) -> tuple:
  return (p["mode"], p["n"], p["c"], p["h"], p["dtype"], p["target"])


def _index(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
  return {(problem_key(r["problem"]), r["impl"]): r for r in records}


def add_ratios(records: list[dict[str, Any]]) -> None:
  """Fill each record's ``ratios``: time and memory over its reference, speed-up over DeepSpeed,
  time over the copy floor of its framework (the project's lines), and the extra peak memory
  over the logits' size (linear mode: the logits never built)."""
  idx = _index(records)
  for r in records:
    ratios: dict[str, float] = {}
    pk = problem_key(r["problem"])
    logits_bytes = Problem(**r["problem"]).logits_bytes
    mem = r.get("memory") or {}
    if mem.get("status") == "ok":
      ratios["extra_peak_x_logits"] = mem["extra_peak_bytes"] / logits_bytes
      if r["problem"]["mode"] == "linear":
        # What the step must return anyway: d/dhidden (N, H) and d/dkernel (H, V).
        p = r["problem"]
        grads = (p["n"] * p["h"] + p["h"] * p["c"]) * (logits_bytes // (p["n"] * p["c"]))
        ratios["extra_peak_less_grads_x_logits"] = (mem["extra_peak_bytes"] - grads) / logits_bytes
    t = r.get("time") or {}
    ref = idx.get((pk, r["ref"])) if r.get("ref") else None
    if ref is not None:
      rt = ref.get("time") or {}
      if t.get("status") == "ok" and rt.get("status") == "ok":
        ratios["time_x_ref"] = t["median"] / rt["median"]
        # Minima: the least disturbed call of each; steadier than medians on a busy machine.
        ratios["time_x_ref_of_minima"] = t["min"] / rt["min"]
      rm = ref.get("memory") or {}
      if mem.get("status") == "ok" and rm.get("status") == "ok" and rm["extra_peak_bytes"] > 0:
        ratios["extra_peak_x_ref"] = mem["extra_peak_bytes"] / rm["extra_peak_bytes"]
    floor = idx.get((pk, FLOOR_KEYS.get(r["framework"])))
    if floor is not None and floor is not r and r["role"] == PROJECT:
      ft = floor.get("time") or {}
      if t.get("status") == "ok" and ft.get("status") == "ok":
        ratios["time_x_floor"] = t["median"] / ft["median"]
    ds = idx.get((pk, DEEPSPEED_KEY))
    if r.get("vs_deepspeed") and ds is not None:
      dt = ds.get("time") or {}
      if t.get("status") == "ok" and dt.get("status") == "ok":
        ratios["speedup_vs_deepspeed"] = dt["median"] / t["median"]
        ratios["speedup_vs_deepspeed_of_minima"] = dt["min"] / t["min"]
    r["ratios"] = ratios


def _find(records, mode: str, n: int, c: int, impl: str, target: bool = True):
  for r in records:
    p = r["problem"]
    if (p["mode"], p["n"], p["c"], r["impl"]) == (mode, n, c, impl) and p["target"] == target:
      return r
  return None


def _check(tid: str, text: str, record, ratio: str, limit: float, op: str,
           shape: str) -> dict[str, Any]:
  """One target: the ratio of medians decides; the ratio of minima is shown beside it."""
  ratios = {} if record is None else record.get("ratios", {})
  value = ratios.get(ratio)
  met = None if value is None else (value <= limit if op == "<=" else value >= limit)
  return {"id": tid, "target": text, "shape": shape, "impl": None if record is None else
          record["impl"], "measured": value, "of_minima": ratios.get(ratio + "_of_minima"),
          "limit": limit, "op": op, "met": met}


def targets(records: list[dict[str, Any]], accelerator: bool = False) -> list[dict[str, Any]]:
  """docs/design.md's targets, each with its measured ratio (None: not measured).

  ``accelerator``: the run was on a GPU, so the floor targets apply (C >= 1000: time at most
  1.5x the copy floor, at least 5x faster than DeepSpeed).
  """
  out = []
  ran = {(r["problem"]["n"], r["problem"]["c"]) for r in records
         if r["problem"]["mode"] == "softmax" and r["problem"]["target"]}
  for n, c in TARGET_SHAPES:
    if (n, c) not in ran:
      continue
    shape = f"({n}, {c})"
    f = lambda impl: _find(records, "softmax", n, c, impl)  # noqa: E731
    out.append(_check("jax_time_vs_optax", "JAX time <= 1.3x optax CE", f("jax_focal"),
                      "time_x_ref", 1.3, "<=", shape))
    out.append(_check("jax_time_vs_optax_donated", "JAX time <= 1.3x optax CE (both donated)",
                      f("jax_focal_donate"), "time_x_ref", 1.3, "<=", shape))
    if (n, c) == (2048, 30522):
      out.append(_check("jax_vs_deepspeed", "JAX >= 3x faster than DeepSpeed", f("jax_focal"),
                        "speedup_vs_deepspeed", 3.0, ">=", shape))
    for key, label in (("torch_focal", "eager"), ("torch_focal_compiled", "compiled")):
      out.append(_check(f"torch_time_vs_ce_{label}",
                        f"torch {label} time <= 1.5x F.cross_entropy {label}", f(key),
                        "time_x_ref", 1.5, "<=", shape))
      out.append(_check(f"torch_vs_deepspeed_{label}",
                        f"torch {label} >= 1.5x faster than DeepSpeed", f(key),
                        "speedup_vs_deepspeed", 1.5, ">=", shape))
    for key, label in (("jax_focal", "JAX"), ("jax_focal_donate", "JAX donated"),
                       ("torch_focal", "torch eager"),
                       ("torch_focal_compiled", "torch compiled")):
      out.append(_check(f"memory_{key}", f"{label} extra peak <= 1.5x logits", f(key),
                        "extra_peak_x_logits", 1.5, "<=", shape))
  for r in records:
    p = r["problem"]
    if not accelerator or p["mode"] != "softmax" or r["role"] != PROJECT or p["c"] < 1000:
      continue
    shape = Problem(**p).label
    out.append(_check(f"gpu_floor_{r['impl']}", f"GPU {r['name']} <= 1.5x the copy floor", r,
                      "time_x_floor", 1.5, "<=", shape))
    if r.get("vs_deepspeed"):
      out.append(_check(f"gpu_vs_deepspeed_{r['impl']}",
                        f"GPU {r['name']} >= 5x faster than DeepSpeed", r,
                        "speedup_vs_deepspeed", 5.0, ">=", shape))
  for r in records:
    p = r["problem"]
    if p["mode"] != "linear" or r["role"] != PROJECT:
      continue
    shape = Problem(**p).label
    fw = "JAX" if r["framework"] == "jax" else "torch"
    out.append(_check(f"linear_memory_{r['framework']}",
                      f"{fw} linear extra peak < 1/8 of the logits (DESIGN.md)", r,
                      "extra_peak_x_logits", 0.125, "<=", shape))
    out.append(_check(f"linear_memory_less_grads_{r['framework']}",
                      f"{fw} linear extra peak less the parameter gradients < 1/8 of the logits",
                      r, "extra_peak_less_grads_x_logits", 0.125, "<=", shape))
    out.append(_check(f"linear_memory_issue_{r['framework']}",
                      f"{fw} linear extra peak <= 0.25x the logits (issue 6)", r,
                      "extra_peak_x_logits", 0.25, "<=", shape))
    out.append(_check(f"linear_time_{r['framework']}",
                      f"{fw} linear time <= 1.5x materialized", r, "time_x_ref", 1.5, "<=",
                      shape))
  return out


# --- formatting ----------------------------------------------------------------------------

def _ms(t: dict[str, Any] | None) -> str:
  if not t or t.get("status") != "ok":
    return "—"
  return f"{t['median'] * 1e3:.3g} ({t['min'] * 1e3:.3g}–{t['max'] * 1e3:.3g})"


def _x(v: float | None, digits: int = 2) -> str:
  return "—" if v is None else f"{v:.{digits}f}x"


def _status(r: dict[str, Any]) -> str:
  for part in ("time", "memory"):
    s = (r.get(part) or {}).get("status")
    if s and s != "ok":
      return f"{part}: {s}: {(r.get(part) or {}).get('reason', '')}"
  return ""


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def shape_table(records: list[dict[str, Any]], pk: tuple) -> str:
  """All implementations at one shape: time, ratios, extra peak memory."""
  rows = []
  for r in records:
    if problem_key(r["problem"]) != pk:
      continue
    rt = r.get("ratios", {})
    mem = r.get("memory") or {}
    mib = (f"{mem['extra_peak_bytes'] / 2**20:.0f} MiB" if mem.get("status") == "ok" else "—")
    ref = f"{_x(rt.get('time_x_ref'))} {r['ref']}" if rt.get("time_x_ref") else ""
    t = r.get("time") or {}
    faults = t.get("minor_faults_median")
    page = _page_size()
    fresh = "—" if faults is None else _x(faults * page / Problem(**r["problem"]).logits_bytes)
    less = rt.get("extra_peak_less_grads_x_logits")
    less = "" if less is None else f"; {_x(less)} less the parameter gradients"
    rows.append([r["name"], r["framework"], _ms(t), ref, _x(rt.get("time_x_floor")),
                 _x(rt.get("speedup_vs_deepspeed"), 1),
                 f"{_x(rt.get('extra_peak_x_logits'))} ({mib}{less})", fresh,
                 _status(r)])
  return _table(["implementation", "fw", "time ms: median (min–max)", "time vs ref",
                 "time vs copy floor", "faster than DeepSpeed", "extra peak / logits",
                 "page faults / logits", "note"], rows)


def _page_size() -> int:
  import resource
  return resource.getpagesize()


def sweep_tables(records: list[dict[str, Any]], mode: str) -> str:
  """Implementations by C for the sweep (not the target shapes): time and memory."""
  sweep = [r for r in records if r["problem"]["mode"] == mode and not r["problem"]["target"]]
  cs = sorted({r["problem"]["c"] for r in sweep})
  ns = {r["problem"]["c"]: r["problem"]["n"] for r in sweep}
  names: list[str] = []
  for r in sweep:
    if r["name"] not in names:
      names.append(r["name"])
  cell = {(r["name"], r["problem"]["c"]): r for r in sweep}
  header = ["implementation"] + [f"C={c} (N={ns[c]})" for c in cs]

  def rows(fmt):
    return [[name] + [fmt(cell.get((name, c))) for c in cs] for name in names]

  def t(r):
    return "—" if r is None or (r.get("time") or {}).get("status") != "ok" else \
        f"{r['time']['median'] * 1e3:.3g}"

  def tr(r):
    return "" if r is None else _x(r.get("ratios", {}).get("time_x_ref"))

  def m(r):
    return "—" if r is None else _x(r.get("ratios", {}).get("extra_peak_x_logits"))

  return "\n\n".join([
      "Median time, ms:\n\n" + _table(header, rows(t)),
      "Time over the reference (same framework, same compile mode):\n\n" + _table(header,
                                                                                   rows(tr)),
      "Extra peak memory over the logits' size:\n\n" + _table(header, rows(m)),
  ])


def targets_table(checks: list[dict[str, Any]]) -> str:
  rows = []
  for c in checks:
    verdict = "not measured" if c["met"] is None else ("met" if c["met"] else "MISSED")
    measured = "—" if c["measured"] is None else f"{c['measured']:.2f}x"
    if c["met"] is False:  # how many times better it must get
      gap = c["measured"] / c["limit"] if c["op"] == "<=" else c["limit"] / c["measured"]
      verdict += f" by {gap:.2f}x"
    minima = "" if c.get("of_minima") is None else f"{c['of_minima']:.2f}x"
    rows.append([c["target"], c["shape"], f"{c['op']} {c['limit']:g}x", measured, minima,
                 verdict])
  return _table(["target", "shape", "limit", "measured (medians)", "minima", "verdict"], rows)


def markdown(doc: dict[str, Any], machine_text: str) -> str:
  """The whole report: command, machine, targets, per-shape tables and the sweep."""
  records = doc["results"]
  parts = [f"Command: `{doc['command']}`", ""]
  if doc.get("label"):
    parts += [doc["label"], ""]
  parts += ["Machine:", "", "```", machine_text, "```", ""]
  if doc.get("load_average_end") is not None:
    parts += ["Load average (1/5/15 min) at the end: "
              + " / ".join(f"{x:.2f}" for x in doc["load_average_end"]), ""]
  if doc["targets"]:
    parts += ["## Targets", "", targets_table(doc["targets"]), ""]
  modes = []
  for r in records:
    if r["problem"]["mode"] not in modes:
      modes.append(r["problem"]["mode"])
  for mode in modes:
    parts += [f"## {mode}", ""]
    pks = []
    for r in records:
      pk = problem_key(r["problem"])
      if pk[0] == mode and pk not in pks:
        pks.append(pk)
    for pk in pks:
      if pk[5] or mode == "linear":
        r0 = next(r for r in records if problem_key(r["problem"]) == pk)
        parts += [f"### {Problem(**r0['problem']).label} {r0['problem']['dtype']}", "",
                  shape_table(records, pk), ""]
    if mode != "linear" and any(pk[0] == mode and not pk[5] for pk in pks):
      parts += ["### sweep", "", sweep_tables(records, mode), ""]
  return "\n".join(parts)

