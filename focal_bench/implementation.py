"""What one benchmark line is: its role, how it runs (``Runner``) and its description (``Impl``).

Each implementation knows its framework, loss mode and role, and builds a ``Runner`` for a
``Problem``: ``run()`` does one forward + backward with respect to the logits (or, in linear
mode, the hidden states and the kernel) and waits for the device; ``setup()`` (optional, not
timed) prepares the next call, e.g. a fresh copy of a buffer that ``run`` donates.

``impls_jax`` and ``impls_torch`` build on this module and ``registry`` lists them; keeping these
definitions apart from the list is what keeps the import graph free of cycles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from focal_bench.problems import Problem

# Roles: what a line in a table is.
PROJECT = "project"      # focal_jax / focal_torch
REFERENCE = "reference"  # the peer a target ratio divides by (cross-entropy, optax focal, ...)
DEEPSPEED = "deepspeed"  # the DeepSpeed algorithm (focal_reference.deepspeed)
FLOOR = "floor"          # a fresh-output copy of the logits: one read + one write
PEER = "peer"            # shown for context, in no target ratio


@dataclasses.dataclass
class Runner:
  run: Callable[[], None]
  setup: Callable[[], None] | None = None
  # JAX: the jitted step and its arguments, for inspecting the compiled HLO.
  jitted: tuple[Callable, tuple] | None = None


class Unavailable(Exception):
  """The implementation cannot run here (a package or function is missing)."""


@dataclasses.dataclass(frozen=True)
class Impl:
  """One line of the benchmark.

  ``ref`` is the key of the implementation this one is divided by in the time and memory
  ratios (None for references themselves); ``vs_deepspeed`` adds a speed-up over DeepSpeed.
  """

  key: str
  name: str
  framework: str  # "jax" or "torch"
  mode: str       # "softmax", "sigmoid", "categorical" or "linear"
  role: str
  build: Callable[[Problem, dict[str, Any]], Runner]
  ref: str | None = None
  vs_deepspeed: bool = False
  compiled: bool = False
  note: str = ""
