"""Row chunks of an ``(outer, C, inner)`` view, so that no ``(N, C)`` temporary is built."""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements per chunk in eager mode: small enough to stay in the CPU's L2 cache and to keep
# temporaries negligible next to the logits, large enough that per-op overhead is small.
CHUNK_ELEMENTS = 1 << 17


def as_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
  """``x`` viewed as ``(outer, C, inner)`` around ``dim`` (a copy only if not viewable)."""
  outer = 1
  for s in x.shape[:dim]:
    outer *= s
  inner = 1
  for s in x.shape[dim + 1:]:
    inner *= s
  return x.reshape(outer, x.shape[dim], inner)


def chunk_elements(total: int, requested: int | None = None) -> int:
  """Elements per chunk: everything at once under torch.compile (it fuses the loops)."""
  if requested is not None:
    return max(1, requested)
  if torch.compiler.is_compiling():
    return max(1, total)
  return CHUNK_ELEMENTS


def chunks(shape: tuple[int, int, int], elements: int
           ) -> Iterator[tuple[slice, slice]]:
  """(outer, inner) slices of an ``(O, C, I)`` tensor with at most ``elements`` entries
  each (or one full class slice ``(1, C, 1)`` when ``C`` alone is larger)."""
  o, c, i = shape
  if o == 0 or i == 0:
    return
  slab = c * i
  if slab <= elements:
    rows = max(1, elements // max(slab, 1))
    for start in range(0, o, rows):
      yield slice(start, min(o, start + rows)), slice(0, i)
  else:
    cols = max(1, elements // max(c, 1))
    for r in range(o):
      for start in range(0, i, cols):
        yield slice(r, r + 1), slice(start, min(i, start + cols))


def max_chunk_numel(shape: tuple[int, int, int], elements: int) -> int:
  """The number of entries of the largest chunk :func:`chunks` yields."""
  o, c, i = shape
  slab = c * i
  if slab <= elements:
    return min(o, max(1, elements // max(slab, 1))) * slab
  return c * min(i, max(1, elements // max(c, 1)))
