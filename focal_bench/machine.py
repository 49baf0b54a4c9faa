"""Describe the machine a benchmark ran on: CPU, cores, memory, accelerators, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

_PACKAGES = ("jax", "jaxlib", "optax", "torch", "numpy", "focal-losses")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages, or None where the OS has none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def code_version() -> dict[str, Any] | None:
  """The git commit of the checkout this package runs from, and its uncommitted library files
  (None outside a git checkout)."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                            capture_output=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "focal_jax", "focal_torch",
                            "focal_reference", "focal_bench"], cwd=root,
                           text=True, capture_output=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "uncommitted": [l[3:] for l in dirty.splitlines()]}


def describe(frameworks: tuple[str, ...] = ("jax", "torch")) -> dict[str, Any]:
  """A JSON-ready description of this machine and of the frameworks' devices."""
  info: dict[str, Any] = {
      "cpu": _cpu_model(),
      "logical_cpus": os.cpu_count(),
      "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "mem_total_gib": _mem_total_gib(),
      "os": platform.platform(),
      "python": sys.version.split()[0],
      "versions": {name: _version(name) for name in _PACKAGES},
      "load_average": load_average(),
      "code": code_version(),
  }
  if "jax" in frameworks:
    import jax
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [str(d) for d in jax.devices()]
  if "torch" in frameworks:
    import torch
    info["torch_threads"] = torch.get_num_threads()
    info["torch_device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
      info["torch_cuda_device"] = torch.cuda.get_device_name()
  return info


def summary(info: dict[str, Any]) -> str:
  """One short paragraph for the console and for BENCHMARKS.md."""
  v = info["versions"]
  parts = [
      f"{info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs, "
      f"{info['mem_total_gib']} GiB RAM, {info['os']}",
      f"python {info['python']}, jax {v.get('jax')} (jaxlib {v.get('jaxlib')}), "
      f"optax {v.get('optax')}, torch {v.get('torch')}, numpy {v.get('numpy')}",
  ]
  if "jax_backend" in info:
    parts.append(f"jax backend {info['jax_backend']}: {', '.join(info['jax_devices'][:2])}"
                 + (" ..." if len(info["jax_devices"]) > 2 else ""))
  if "torch_device" in info:
    dev = info.get("torch_cuda_device", "cpu")
    parts.append(f"torch device {dev}, {info['torch_threads']} intra-op threads")
  if info.get("code"):
    code = info["code"]
    parts.append(f"code at commit {code['commit']}" + (
        f" with uncommitted changes in {', '.join(code['uncommitted'])}"
        if code["uncommitted"] else ""))
  if info.get("load_average") is not None:
    parts.append("load average (1/5/15 min) at start: "
                 + " / ".join(f"{x:.2f}" for x in info["load_average"]))
  return "\n".join(parts)
