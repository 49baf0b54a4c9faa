"""The benchmark problems: shapes of the sweep, the target shapes, and their seeded data."""

from __future__ import annotations

import dataclasses

import numpy as np

# The shapes named by the speed targets (docs/design.md): BERT's masked-LM head and a
# detection head.
TARGET_SHAPES: tuple[tuple[int, int], ...] = ((2048, 30522), (16384, 91))
# The class counts of the sweep; N is chosen so that N * C stays near the element budget.
SWEEP_CLASSES: tuple[int, ...] = (2, 16, 91, 1000, 8192, 30522, 131072)
QUICK_CLASSES: tuple[int, ...] = (91, 1000)
# The fused linear case (issue 6): (N x H) @ (H x V).
LINEAR_SHAPE: tuple[int, int, int] = (4096, 512, 32768)
QUICK_LINEAR_SHAPE: tuple[int, int, int] = (256, 64, 4096)

GAMMA = 2.0
# Sigmoid peers use torchvision's default alpha, so every sigmoid implementation weighs alike.
SIGMOID_ALPHA = 0.25
# Fraction of positive labels in the multi-label sigmoid problems.
SIGMOID_POSITIVE_RATE = 0.1
# The categorical problems' targets: one-hot labels smoothed by this much (optax.smooth_labels'
# form, (1 - eps) * one_hot + eps / C), so every class carries some probability.
CATEGORICAL_SMOOTHING = 0.1


@dataclasses.dataclass(frozen=True)
class Problem:
  """One benchmark case: which loss, which shape, which data.

  ``mode`` is "softmax" (integer labels, (N, C) logits), "sigmoid" ((N, C) logits and 0/1
  labels), "categorical" ((N, C) logits and (N, C) probability targets) or "linear" ((N, H) hidden, (H, V) kernel, (N,) labels; ``c`` is V, ``h`` is H).
  ``target`` marks the shapes named by docs/design.md's speed targets.
  """

  mode: str
  n: int
  c: int
  h: int = 0
  dtype: str = "float32"
  seed: int = 0
  target: bool = False

  @property
  def label(self) -> str:
    if self.mode == "linear":
      return f"({self.n}x{self.h})@({self.h}x{self.c})"
    return f"({self.n}, {self.c})"

  @property
  def logits_elements(self) -> int:
    return self.n * self.c

  @property
  def logits_bytes(self) -> int:
    return self.logits_elements * np.dtype(_storage_dtype(self.dtype)).itemsize

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _storage_dtype(dtype: str) -> str:
  # bfloat16 has no NumPy dtype; its itemsize is that of float16.
  return "float16" if dtype == "bfloat16" else dtype


def sweep(mode: str, classes: tuple[int, ...], budget: int, max_elements: int,
          targets: bool, dtype: str = "float32") -> list[Problem]:
  """The sweep over ``classes`` with N * C near ``budget``, plus the target shapes.

  Shapes whose logits exceed ``max_elements`` are left out (the machine's memory bound).
  """
  problems = []
  for c in classes:
    n = max(1, budget // c)
    if n * c <= max_elements:
      problems.append(Problem(mode, n, c, dtype=dtype))
  if targets:
    for n, c in TARGET_SHAPES:
      if n * c <= max_elements:
        problems.append(Problem(mode, n, c, dtype=dtype, target=True))
  return sorted(set(problems), key=lambda p: (p.c, p.n, p.target))


def make_data(problem: Problem) -> dict[str, np.ndarray]:
  """Seeded NumPy inputs for ``problem`` (float32 storage; frameworks cast to ``dtype``).

  Logits are standard normal times 2, so the focal factor is neither ~0 nor ~1.
  """
  rng = np.random.default_rng(problem.seed)
  n, c = problem.n, problem.c
  if problem.mode == "softmax":
    logits = rng.standard_normal((n, c), dtype=np.float32)
    logits *= 2.0
    return {"logits": logits, "labels": rng.integers(0, c, size=(n,), dtype=np.int64)}
  if problem.mode == "sigmoid":
    logits = rng.standard_normal((n, c), dtype=np.float32)
    logits *= 2.0
    labels = (rng.random((n, c), dtype=np.float32) < SIGMOID_POSITIVE_RATE).astype(np.float32)
    return {"logits": logits, "labels": labels}
  if problem.mode == "categorical":
    # Smoothed one-hot targets of seeded uniform labels: rows sum to 1, no class is 0.
    logits = rng.standard_normal((n, c), dtype=np.float32)
    logits *= 2.0
    labels = rng.integers(0, c, size=(n,), dtype=np.int64)
    eps = CATEGORICAL_SMOOTHING
    targets = np.full((n, c), eps / c, dtype=np.float32)
    targets[np.arange(n), labels] += np.float32(1.0 - eps)
    return {"logits": logits, "targets": targets}
  if problem.mode == "linear":
    hidden = rng.standard_normal((n, problem.h), dtype=np.float32)
    kernel = rng.standard_normal((problem.h, c), dtype=np.float32)
    kernel *= 2.0 / np.sqrt(problem.h)
    return {"hidden": hidden, "kernel": kernel,
            "labels": rng.integers(0, c, size=(n,), dtype=np.int64)}
  raise ValueError(f"make_data: mode must be softmax, sigmoid, categorical or linear, "
                   f"got {problem.mode!r}")
