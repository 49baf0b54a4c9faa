"""Classes split across the ranks of a process group (vocabulary parallelism).

Each rank of ``class_process_group`` holds a contiguous, equal slice of the classes in group
order: rank ``r`` of ``k`` holds classes ``[r C/k, (r + 1) C/k)`` (the columns of its logits
along ``dim``, or its rows of an ``nn.Linear`` weight). Labels are global class ids. Only
per-row numbers cross the group, as all-reduces in the forward pass:

- MAX of each rank's largest logit (the largest non-target one for the softmax loss),
- SUM of each rank's sum of exponentials rescaled to that maximum, of the owner's target
  logit (0 on the other ranks), of the row sum of the logits (label smoothing), and of the
  categorical loss's per-row sums.

Every rank then holds the same per-row statistics as a single process would, returns the
whole loss, and its backward writes the gradient of its own slice with no communication.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from focal_torch import _checks

NAME = "class_process_group"


class ClassSplit:
  """This rank's slice of the classes of a class group.

  Attributes:
    group: the ``torch.distributed`` group.
    size: ``k``, the number of ranks in it.
    rank: this rank's index in the group.
    local: the classes this rank holds (``C / k``).
    num_classes: ``C``, all the classes.
    lo: the first (global) class of this rank's slice.
  """

  def __init__(self, fn: str, group: Any, local: int) -> None:
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    self.fn = fn
    self.group = group
    self.size = dist.get_world_size(group)
    self.rank = dist.get_rank(group)
    self.local = int(local)
    self.num_classes = self.local * self.size
    self.lo = self.rank * self.local
    self.checked = False  # the slices' sizes (see row_max)

  def localize(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_local, owned)`` for global labels ``t``: whether this rank holds the label's
    class, and its index in the slice (0 where it does not)."""
    owned = (t >= self.lo) & (t < self.lo + self.local)
    return torch.where(owned, t - self.lo, torch.zeros((), dtype=t.dtype, device=t.device)), owned

  def row_max(self, m: torch.Tensor) -> torch.Tensor:
    """The group's MAX of the per-row tensor ``m`` (a new tensor). The same collective
    carries each rank's number of classes: on the first call of a loss, while the value
    checks are on (reading it synchronizes a CUDA device), every rank raises together
    unless all hold as many classes."""
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    local = float(self.local)
    flat = torch.cat([m.reshape(-1), m.new_tensor([local, -local])])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.group)
    if self.checked or not _checks.checks_enabled():
      return flat[:-2].reshape(m.shape)
    self.checked = True
    most, fewest = flat[-2:].tolist()
    if most != -fewest:
      raise ValueError(
          f"{self.fn}: every rank of {NAME} must hold the same number of classes (an equal, "
          f"contiguous slice of the C classes), got between {int(-fewest)} and {int(most)} "
          "on the ranks of this group")
    return flat[:-2].reshape(m.shape)

  def row_sum(self, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The group's SUM of each per-row tensor (None stays None), in one all-reduce."""
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    present = [x for x in xs if x is not None]
    flat = torch.stack([x.reshape(-1) for x in present])
    dist.all_reduce(flat, group=self.group)
    out, i = [], 0
    for x in xs:
      if x is None:
        out.append(None)
      else:
        out.append(flat[i].reshape(x.shape))
        i += 1
    return out

  def argmax(self, y: torch.Tensor, dim: int) -> torch.Tensor:
    """The global argmax of ``y`` along its class axis ``dim`` (the first of equal maxima,
    like ``torch.argmax``): a MAX and a MIN all-reduce of per-row numbers."""
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    value, index = y.max(dim)
    value = value.detach().to(torch.float64 if value.dtype == torch.float64 else torch.float32)
    best = value.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self.group)
    none = torch.full((), self.num_classes, dtype=torch.int64, device=y.device)
    first = torch.where(value == best, index.to(torch.int64) + self.lo, none).contiguous()
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=self.group)
    return first

  def class_slice(self, value: Any) -> Any:
    """A global ``(C,)`` hyperparameter cut to this rank's classes; others as they are."""
    if isinstance(value, torch.Tensor) and value.ndim == 1:
      return value[self.lo:self.lo + self.local]
    return value


def _length(value: Any) -> int | None:
  """The length of a 1-D hyperparameter (tensor, list, tuple, NumPy array), else None."""
  if isinstance(value, torch.Tensor):
    return value.shape[0] if value.ndim == 1 else None
  if isinstance(value, (list, tuple, np.ndarray)):
    try:
      arr = np.asarray(value)
    except ValueError:
      return None
    return arr.shape[0] if arr.ndim == 1 else None
  return None


def check_divisible(fn: str, size: int, **vectors: Any) -> None:
  """A ``(C,)`` hyperparameter must have a length that the group size divides."""
  for name, value in vectors.items():
    n = _length(value)
    if n is not None and n % size:
      raise ValueError(
          f"{fn}: the C classes must split evenly over the {size} ranks of {NAME} (each rank "
          f"holds C/{size} of them), but {name} has {n} entries (C = {n}, not divisible by "
          f"{size})")


def resolve(fn: str, group: Any, local: int, **vectors: Any) -> ClassSplit | None:
  """The :class:`ClassSplit` of ``class_process_group`` at call (None: no split); checks
  that the global ``(C,)`` vectors among ``vectors`` split evenly over the group."""
  group = _checks.process_group(fn, group, name=NAME)
  if group is None:
    return None
  split = ClassSplit(fn, group, local)
  check_divisible(fn, split.size, **vectors)
  return split


def check_at_construction(fn: str, group: Any, **vectors: Any) -> Any:
  """``class_process_group`` at module construction: None, ``"world"`` (kept, resolved at
  each call) or a group; when the group's size can be known already (a group, or
  ``"world"`` with torch.distributed initialized), the ``(C,)`` vectors must split evenly."""
  group = _checks.process_group(fn, group, at_call=False, name=NAME)
  if group is None:
    return None
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  if isinstance(group, str):
    if not (dist.is_available() and dist.is_initialized()):
      return group
    size = dist.get_world_size()
  else:
    size = dist.get_world_size(group)
  check_divisible(fn, size, **vectors)
  return group


def no_double_backward(fn: str) -> RuntimeError:
  """The error a class-split Function raises when asked for a double backward."""
  return RuntimeError(
      f"{fn}: create_graph=True (double backward) is not supported with class_process_group: "
      "the backward of the backward would need the other ranks' classes")
