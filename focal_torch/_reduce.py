"""The one reduction shared by every focal_torch loss, with the cross-process convention."""

from __future__ import annotations

import torch


def reduce_loss(loss: torch.Tensor, reduction: str, *, valid: torch.Tensor | None,
                positive: torch.Tensor | None, process_group, out_dtype: torch.dtype
                ) -> torch.Tensor:
  """Reduces per-entry losses; masked entries must already hold 0.

  Args:
    loss: per-entry losses in the compute dtype (float32 or float64).
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"``.
    valid: bool mask of the entries that count (None: all of them).
    positive: bool mask of the valid positive entries (only read for ``"mean_positive"``).
    process_group: None, or the group over which the denominators are summed.
    out_dtype: dtype of the result.

  Returns:
    ``loss`` itself for ``"none"``; otherwise ``n * local_sum / global_denominator`` with
    ``n`` the group size (1 without a group) and the denominator 1 for ``"sum"``. The
    denominators are detached and all-reduced (only scalars cross the wire), so that
    averaging the value and the gradients over the group (DDP) gives the single-process
    result on the whole batch. A denominator of 0 is taken as 1.
  """
  if reduction == "none":
    return loss.to(out_dtype)
  return finish(loss.sum(), reduction, count=loss.numel(), valid=valid, positive=positive,
                process_group=process_group, out_dtype=out_dtype)


def finish(total: torch.Tensor, reduction: str, *, count: int, valid: torch.Tensor | None,
           positive: torch.Tensor | None, process_group, out_dtype: torch.dtype
           ) -> torch.Tensor:
  """The denominator part of :func:`reduce_loss`, for a local sum computed elsewhere (the
  fused linear loss sums inside its autograd.Function); ``count`` is the number of entries
  (the ``"mean"`` denominator when ``valid`` is None)."""
  if reduction == "sum":
    denominator = None
  elif reduction == "mean":
    # count_nonzero, not sum: a bool sum is taken in int64, a temporary 8x the mask's size.
    denominator = (total.new_full((), float(count)) if valid is None
                   else torch.count_nonzero(valid).to(total.dtype))
  elif reduction == "mean_positive":
    assert positive is not None
    denominator = torch.count_nonzero(positive).to(total.dtype)
  else:  # the callers check reduction; this is a programming error
    raise AssertionError(reduction)
  if process_group is not None:
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    # Only the scalar denominators are summed over the group; no gradient flows through them.
    if denominator is not None:
      denominator = denominator.detach().clone()
      dist.all_reduce(denominator, group=process_group)
    total = total * dist.get_world_size(process_group)
  if denominator is not None:
    # An empty or all-masked batch gives 0, never NaN.
    total = total / denominator.clamp_min(1)
  return total.to(out_dtype)
