"""PNG plots: time and extra peak memory against C, one line per implementation."""

from __future__ import annotations

import os
from typing import Any

from focal_bench.registry import DEEPSPEED, FLOOR, PROJECT, REFERENCE

_STYLE = {PROJECT: "-", REFERENCE: "--", DEEPSPEED: ":", FLOOR: "-."}


def plot_mode(records: list[dict[str, Any]], mode: str, out_dir: str) -> str | None:
  """Draw ``<out_dir>/<mode>.png`` from the sweep records of ``mode``; its path, or None."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sweep = [r for r in records if r["problem"]["mode"] == mode and not r["problem"]["target"]]
  if not sweep:
    return None
  frameworks = [fw for fw in ("jax", "torch") if any(r["framework"] == fw for r in sweep)]
  fig, axes = plt.subplots(2, len(frameworks), figsize=(5.2 * len(frameworks), 7), dpi=72,
                           squeeze=False)
  elements = sorted({r["problem"]["n"] * r["problem"]["c"] for r in sweep})
  for col, fw in enumerate(frameworks):
    lines = [r for r in sweep if r["framework"] == fw
             or (r["role"] == DEEPSPEED and fw == "jax")]
    names = []
    for r in lines:
      if r["name"] not in names:
        names.append(r["name"])
    for name in names:
      pts = sorted((r["problem"]["c"], r) for r in lines if r["name"] == name)
      role = pts[0][1]["role"]
      style = _STYLE.get(role, "-")
      label = name + (" (torch)" if fw == "jax" and role == DEEPSPEED else "")
      t = [(c, r["time"]["median"] * 1e3) for c, r in pts
           if (r.get("time") or {}).get("status") == "ok"]
      m = [(c, r["ratios"]["extra_peak_x_logits"]) for c, r in pts
           if "extra_peak_x_logits" in r.get("ratios", {})]
      if t:
        axes[0][col].plot(*zip(*t), style, marker="o", ms=3, label=label)
      if m:
        axes[1][col].plot(*zip(*m), style, marker="o", ms=3, label=label)
    axes[0][col].set_title(f"{mode}, {fw}: forward + backward")
    axes[0][col].set_ylabel("median time, ms")
    axes[0][col].set_yscale("log")
    axes[1][col].set_ylabel("extra peak memory / logits")
    axes[1][col].set_title("extra peak memory of one step")
    for ax in (axes[0][col], axes[1][col]):
      ax.set_xscale("log")
      ax.set_xlabel(f"classes C (N * C about {elements[-1]:,})")
      ax.grid(True, which="both", alpha=0.3)
    axes[0][col].legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{mode}.png")
  fig.savefig(path)
  plt.close(fig)
  return path
