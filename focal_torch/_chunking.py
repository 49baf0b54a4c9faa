"""Row views and row chunks, so that no temporary of the logits' size is built.

The losses see their logits as ``(rows, C)`` when nothing follows the class axis (the common
``(N, C)`` case), else as ``(outer, C, inner)``. Per-row tensors have the same number of
axes with size 1 on the class axis: ``(rows, 1)`` or ``(outer, 1, inner)``. torch's CPU
kernels vectorize 2-D rows far better than ``(rows, C, 1)``, hence the two layouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

# Elements per chunk in eager mode (4 MiB of float32): temporaries stay negligible next to
# large logits and within the CPU's last-level cache, and there are few enough chunks that
# per-op dispatch and thread fork/join cost little.
CHUNK_ELEMENTS = 1 << 20


def as_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
  """``x`` viewed as ``(rows, C)`` or ``(outer, C, inner)`` around ``dim`` (a copy only if
  not viewable)."""
  outer = 1
  for s in x.shape[:dim]:
    outer *= s
  inner = 1
  for s in x.shape[dim + 1:]:
    inner *= s
  if inner == 1:
    return x.reshape(outer, x.shape[dim])
  return x.reshape(outer, x.shape[dim], inner)


def row_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of a per-row tensor for a rows view of ``shape``."""
  return (shape[0], 1) + tuple(shape[2:])


def class_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of a ``(C,)`` vector that broadcasts against a rows view of ``shape``."""
  return (1, shape[1]) + (1,) * (len(shape) - 2)


def chunk_elements(total: int, requested: int | None = None) -> int | None:
  """Elements per chunk; None (one chunk: everything at once) under torch.compile, which
  fuses the loops. None rather than the (possibly symbolic) total: dynamo cannot pass a
  symbolic int into a second autograd.Function of one graph (torch 2.13, dynamic=True)."""
  del total
  if requested is not None:
    return max(1, requested)
  if torch.compiler.is_compiling():
    return None
  return CHUNK_ELEMENTS


def _rows_per_chunk(shape: tuple[int, ...], elements: int | None) -> tuple[int, int]:
  """(rows, inner columns) per chunk (``elements`` None: one chunk)."""
  o, c = shape[0], shape[1]
  i = shape[2] if len(shape) == 3 else 1
  if elements is None:
    return o, i
  if c * i <= elements:
    return min(o, max(1, elements // max(c * i, 1))), i
  return 1, min(i, max(1, elements // max(c, 1)))


def chunks(shape: tuple[int, ...], elements: int | None) -> Iterator[tuple]:
  """Index tuples of the chunks of a rows view: at most ``elements`` entries each, or one
  class slice when ``C`` alone is larger (``elements`` None: one chunk, the whole view).
  The same index selects the matching part of a per-row tensor."""
  o = shape[0]
  if o == 0 or (len(shape) == 3 and shape[2] == 0):
    return
  if elements is None:
    yield (slice(None),) * len(shape)
    return
  rows, cols = _rows_per_chunk(shape, elements)
  if len(shape) == 2:
    for start in range(0, o, rows):
      yield (slice(start, min(o, start + rows)),)
    return
  i = shape[2]
  for start in range(0, o, rows):
    for col in range(0, i, cols):
      yield slice(start, min(o, start + rows)), slice(None), slice(col, min(i, col + cols))


def max_chunk_rows(shape: tuple[int, ...], elements: int | None) -> int:
  """Rows x inner columns of the largest chunk: its size is this times ``C``."""
  rows, cols = _rows_per_chunk(shape, elements)
  return rows * cols


def class_vector(value: Any, cdt: torch.dtype, device: torch.device,
                  shape3: tuple[int, ...]) -> Any:
  """A ``(C,)`` hyperparameter shaped to broadcast against a rows view (see
  :func:`class_shape`); scalars as they are."""
  if isinstance(value, torch.Tensor):
    value = value.to(device=device, dtype=cdt)
    if value.ndim == 1:
      return value.reshape(class_shape(shape3))
  return value
