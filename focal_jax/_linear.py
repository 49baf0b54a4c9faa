"""Fused linear + softmax focal loss: chunked over rows, never builds the (N, V) logits.

The per-row math is `_softmax`'s (`row_stats`, `grad_from_stats`: docs/math.md, "Softmax" and
its "Names" table, "Why a `custom_jvp` in JAX and an `autograd.Function` in torch"). What this
module adds is engine work (JAX-specific, below its marked boundary): a `lax.scan` over chunks
of rows for the per-row scalars, and one over (tile_rows, block) tiles of the logits for the
tangent, which reverse mode transposes into the parameter gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from focal_jax import _checks
from focal_jax import _numerics
from focal_jax import _reduce
from focal_jax import _rowreduce
from focal_jax import _softmax

# --- engine (JAX-specific: lax.scan over row chunks and (tile_rows, block) tiles) -------------

# Automatic chunk size: about this many logits (chunk * V) per chunk, i.e. 16 MiB in float32.
# Big enough for an efficient (chunk, H) @ (H, V) matmul, small enough that the few
# (chunk, V) buffers of a step stay well under the logits of any vocabulary-sized problem.
_CHUNK_ELEMENTS = 1 << 22

# The derivative works on (tile_rows, block) tiles of the logits and adds each tile's
# (H, block) kernel gradient into its columns of the kernel gradient in place. A tile and that
# product each hold about a quarter of a chunk's logits (chunk * V / 4 elements, 4 MiB in
# float32 with the automatic chunk), and at least this many, for efficient matmuls.
_MIN_TILE_ELEMENTS = 1 << 16


def _floor_pow2(n: int) -> int:
  return 1 << (max(int(n), 1).bit_length() - 1)


def _auto_chunk(num_rows: int, vocab: int) -> int:
  chunk = _floor_pow2(_CHUNK_ELEMENTS // max(vocab, 1))
  # Never more chunks than needed: at most the (8-aligned) number of rows.
  return max(1, min(chunk, -(-num_rows // 8) * 8))


def _auto_tile(num_rows: int, vocab: int, size: int, chunk: int) -> tuple[int, int]:
  """(tile_rows, block) of the derivative pass, for `num_rows` rows and a (size, vocab) kernel."""
  budget = max(_MIN_TILE_ELEMENTS, chunk * vocab // 4)
  block = min(vocab, _floor_pow2(max(128, budget // max(size, 1))))
  tile_rows = min(num_rows, _floor_pow2(max(8, budget // block)))
  return tile_rows, block


def _logits(h, kernel, bias, cdtype):
  # Accumulate in the compute dtype (float32 at least), also for bf16 / fp16 inputs.
  z = jnp.matmul(h, kernel, preferred_element_type=cdtype)
  return z if bias is None else z + bias.astype(cdtype)[None, :]


def _chunked(x, chunk):
  return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


@dataclasses.dataclass(frozen=True)
class LinearOptions:
  """The checked settings of one fused linear softmax focal loss call that are not arrays,
  passed whole to the custom_jvp functions (a nondiff argument) and the checkpointed tile
  tangent (a static argument): frozen and hashable.

  Attributes:
    label_smoothing: `eps` in [0, 1].
    chunk_size: rows per chunk of the forward pass (divides the padded row count).
    tile: `(tile_rows, block)` of the derivative pass's tiles of the logits.
    split: the `_rowreduce.ClassSplit` of `class_axis_name` (this member holds a slice of the
      kernel's columns), or None.
    compute_dtype: the dtype of the products and the math (float32 at least).
  """
  label_smoothing: float
  chunk_size: int
  tile: tuple[int, int]
  split: _rowreduce.ClassSplit | None
  compute_dtype: Any


def _stats_pass_plain(h, kernel, bias, t, alpha, gamma, valid, in_range, options: LinearOptions):
  """RowStats of every row (each field of shape (N,)), one (chunk, V) block of logits at a time.

  With `options.split` (the vocabulary split over a named axis, `kernel` and `bias` this
  member's columns): each chunk gives this member's one-pass partials, combined over the axis
  once for all rows after the loop ((N,)-sized collectives).
  """
  eps, chunk, cdtype, split = (options.label_smoothing, options.chunk_size,
                               options.compute_dtype, options.split)
  if split is not None:
    first = split.first()

    def local(_, xs):
      h_c, t_c = xs
      z = _logits(h_c, kernel, bias, cdtype)
      raw = _rowreduce.softmax_stats(z, t_c - first, cdtype)
      return None, raw + ((jnp.sum(z, axis=-1),) if eps > 0.0 else ())
    raw = lax.scan(local, None, (_chunked(h, chunk), _chunked(t, chunk)))[1]
    raw = tuple(x.reshape(-1) for x in raw)
    m, s_rest, z_t, z_sum = _rowreduce.combine_softmax_stats(
        *raw[:3], raw[3] if eps > 0.0 else None, split)
    return _softmax.stats_from_raw(m, s_rest, z_t, z_sum, alpha, gamma, valid, in_range, eps,
                                   split.num_classes)

  def body(_, xs):
    h_c, t_c, alpha_c, gamma_c, valid_c, in_range_c = xs
    z = _logits(h_c, kernel, bias, cdtype)
    return None, _softmax.row_stats(z, t_c, alpha_c, gamma_c, valid_c, in_range_c, eps)
  xs = tuple(_chunked(x, chunk) for x in (h, t, alpha, gamma, valid, in_range))
  stats = lax.scan(body, None, xs)[1]
  return _softmax.RowStats(*(x.reshape(-1) for x in stats))


# The same function behind a custom_jvp whose rule is plain autodiff, for one reason: memory.
# Reverse mode partially evaluates the rule of _linear_rows below, and JAX's partial evaluation
# of a lax.scan hoists every loop-invariant value of the body out of the loop -- here the
# (chunk, V) class iota and broadcast constants of row_stats, extra (chunk, V) buffers that
# stay alive through the loop. A custom_jvp call whose inputs are all known is not partially
# evaluated but called as it is, so the loop keeps them inside, where XLA fuses them away.
_stats_pass = jax.custom_jvp(_stats_pass_plain, nondiff_argnums=(8,))


@_stats_pass.defjvp
def _stats_pass_jvp(options, primals, tangents):
  return jax.jvp(lambda *args: _stats_pass_plain(*args, options), primals, tangents)


def _tile_tangent(h, kernel, bias, t, st, valid, dh, dkernel, dbias, i, options: LinearOptions):
  """Row sums of dloss/dz * dz over tile i of the logits, dz = dh W + h dW + db.

  Tiles are (tile_rows, block); tile i covers block b = i // (tiles per column) of columns
  and row tile c = i % (tiles per column), so consecutive tiles share kernel columns. A last
  row or column tile that would run past the end starts at N - tile_rows or V - block instead
  (where a dynamic slice clamps anyway) and masks the rows or columns the tile before it
  already covered: no array is ever padded or copied to a multiple of the tile.
  Returns the first row of the tile and its (tile_rows,) row sums. With `options.split`,
  `kernel` holds this member's columns of the vocabulary (classes `split.first()` on).
  """
  eps, cdtype, split = options.label_smoothing, options.compute_dtype, options.split
  tile_rows, block = options.tile
  num_rows, vocab = h.shape[0], kernel.shape[1]
  row_tiles = -(-num_rows // tile_rows)
  b, c = i // row_tiles, i % row_tiles
  row0 = jnp.minimum(c * tile_rows, num_rows - tile_rows)
  col0 = jnp.minimum(b * block, vocab - block)

  def rows(x):
    return lax.dynamic_slice_in_dim(x, row0, tile_rows, axis=0)

  def cols(x):
    return lax.dynamic_slice_in_dim(x, col0, block, axis=x.ndim - 1)

  # Masked rows' features are taken as 0 here: whatever they hold (NaN, inf), they add exactly
  # 0 to the kernel gradient (h^T g would give 0 * NaN = NaN otherwise).
  valid_c = rows(valid)
  h_c, kernel_b = jnp.where(valid_c[:, None], rows(h), 0), cols(kernel)
  z = _logits(h_c, kernel_b, None if bias is None else cols(bias), cdtype)
  new_rows = lax.iota(jnp.int32, tile_rows) + row0 >= c * tile_rows
  new_cols = lax.iota(jnp.int32, block) + col0 >= b * block
  if split is None:
    first_class, num_classes = col0, vocab
  else:
    first_class, num_classes = split.first() + col0, split.num_classes
  g = _softmax.grad_from_stats(z, rows(t), _softmax.RowStats(*map(rows, st)),
                               valid_c & new_rows, eps, first_class=first_class,
                               num_classes=num_classes)
  g = jnp.where(new_cols[None, :], g, 0.0)
  dz = None
  if dh is not None:
    dz = jnp.matmul(rows(dh), kernel_b, preferred_element_type=cdtype)
  if dkernel is not None:
    term = jnp.matmul(h_c, cols(dkernel), preferred_element_type=cdtype)
    dz = term if dz is None else dz + term
  if dbias is not None:
    term = jnp.broadcast_to(cols(dbias).astype(cdtype)[None, :], g.shape)
    dz = term if dz is None else dz + term
  return row0, jnp.sum(g * dz, axis=-1)


# Checkpointed: reverse mode keeps no tile -- each tile's logits and gradient are recomputed in
# the backward pass from the inputs and the per-row scalars, so only O(tile) is alive. The
# transposed loop adds each tile's (H, block) kernel gradient into its columns in place.
_tile_tangent_remat = jax.checkpoint(_tile_tangent, static_argnums=(10,))


# A custom_jvp (not a custom_vjp, which jax.hessian cannot forward-differentiate). Its rule is
# a row-chunked scan for the per-row scalars, then a scan over (tile_rows, block) tiles for the
# tangent, linear in (dh, dkernel, dbias). JAX linearizes and transposes that second scan for
# reverse mode, which keeps the parameter cotangents' types (dtype, and the varying/replicated
# axes under shard_map) automatically, and the transposed scan accumulates the hidden, kernel
# and bias gradients tile by tile. The per-row math is softmax_focal's (row_stats /
# grad_from_stats), so both compute the same numbers.
@functools.partial(jax.custom_jvp, nondiff_argnums=(8,))
def _linear_rows(h, kernel, bias, t, alpha, gamma, valid, in_range, options: LinearOptions):
  """Per-row losses of softmax_focal(h @ kernel + bias), h of shape (num_chunks * chunk, H).

  Only the derivative is tiled (`options.tile`).
  """
  return _stats_pass_plain(h, kernel, bias, t, alpha, gamma, valid, in_range, options).loss


def _linear_rows_jvp(options, primals, tangents):
  h, kernel, bias, t, alpha, gamma, valid, in_range = primals
  dh, dkernel, dbias, _, dalpha, dgamma, _, _ = map(_numerics.given, tangents)
  if bias is None:
    dbias = None
  split, tile = options.split, options.tile
  st = _stats_pass(h, kernel, bias, t, alpha, gamma, valid, in_range, options)
  tangent = jnp.zeros_like(st.loss)
  if dh is not None or dkernel is not None or dbias is not None:
    num_tiles = -(-h.shape[0] // tile[0]) * -(-kernel.shape[1] // tile[1])
    if split is not None:
      # The loop adds this member's (varying) sums into the tangent. A replicated hidden's
      # tangent is made varying here, once: reverse mode then sums the members' (N, H)
      # shares of its gradient once, after the loop, not once per tile.
      tangent = _rowreduce.to_varying(tangent, split.axis_name)
      if dh is not None:
        dh = _rowreduce.to_varying(dh, split.axis_name)

    def body(tangent, i):
      row0, sums = _tile_tangent_remat(h, kernel, bias, t, st, valid, dh, dkernel, dbias, i,
                                       options)
      # Added in place into the rows of the tile (its masked rows add 0).
      total = lax.dynamic_slice_in_dim(tangent, row0, tile[0]) + sums
      return lax.dynamic_update_slice_in_dim(tangent, total, row0, axis=0), None
    tangent = lax.scan(body, tangent, jnp.arange(num_tiles, dtype=jnp.int32))[0]
    if split is not None:
      # This member's vocabulary columns' share; the whole rows' tangent sums the members'
      # (reverse mode transposes it into handing each member the cotangent).
      tangent = lax.psum(tangent, split.axis_name)
  return st.loss, _numerics.tangent_sum(
      st.loss, (dalpha, lambda d: st.dloss_dalpha * d), (dgamma, lambda d: st.dloss_dgamma * d),
      start=tangent)


_linear_rows.defjvp(_linear_rows_jvp, symbolic_zeros=True)

# --- end of engine -----------------------------------------------------------------------


def linear_softmax_focal(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    alpha: jax.typing.ArrayLike | None = None,
    gamma: jax.typing.ArrayLike = 2.0,
    label_smoothing: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "none",
    background_class: int = 0,
    axis_name: Any = None,
    sample_weight: jax.typing.ArrayLike | None = None,
    class_axis_name: Any = None,
) -> jax.Array:
  r"""Softmax focal loss of a linear layer's output, without materializing the logits.

  Equals ``softmax_focal(hidden @ kernel + bias, labels, ...)`` in value and in the gradients
  with respect to ``hidden``, ``kernel`` and ``bias`` (and ``alpha``, ``gamma``), but works on
  ``chunk_size`` rows at a time: the ``(N, V)`` logits and their gradient are never built.
  Forward and backward keep ``O(chunk_size * V)`` memory beyond the inputs and the parameter
  gradients: the forward pass keeps a few scalars per row, and the backward pass recomputes
  the logits in tiles of about ``chunk_size * V / 4`` (one extra matmul) and adds each tile's
  share of the ``kernel`` gradient into it in place.

  .. math::
    z = h W + b, \qquad
    \ell = \alpha_t (1 - p)^{\gamma_t} \left[-(1 - \epsilon) \log p
      - \frac{\epsilon}{V} \sum_v \log s_v\right], \quad s = \mathrm{softmax}(z), p = s_t

  Made for large-vocabulary heads (masked-LM, LLM): ``kernel`` is ``(H, V)``, as flax
  ``nn.Dense`` stores it. Matmuls accumulate in float32 at least; the result has the dtype of
  ``hidden @ kernel``.

  Args:
    hidden: ``(..., H)`` floating-point features (e.g. ``(N, H)`` or ``(B, T, H)``).
    kernel: ``(H, V)`` weights.
    labels: integers in ``[0, V)``, shape ``hidden.shape[:-1]``; an unmasked out-of-range
      label gives NaN for its entry (never wraps).
    bias: optional ``(V,)`` bias.
    chunk_size: rows per chunk of the forward pass (a positive int); it also sizes the tiles
      of the backward pass. None picks one so that a chunk holds about 4M logits (16 MiB in
      float32), capped by the number of rows.
    alpha: None, a scalar, or a ``(V,)`` vector of class weights, finite and ``>= 0``.
    gamma: a finite scalar ``>= 0`` or a ``(V,)`` vector.
    label_smoothing: :math:`\epsilon \in [0, 1]`, on the cross-entropy term only.
    where: optional boolean mask of shape ``hidden.shape[:-1]`` (or broadcastable to it).
    ignore_index: optional label value treated like ``where=False``.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"``, as in
      ``softmax_focal``.
    background_class: the label ``"mean_positive"`` does not count as positive.
    axis_name: optional named axis (pmap, shard_map), with ``softmax_focal``'s convention.
    sample_weight: optional non-negative per-row weights, a scalar or an array broadcastable
      to the shape of ``labels``; they multiply each row's loss and gradients before the
      reduction, with the denominators unchanged. Never differentiated; masked rows stay 0.
    class_axis_name: optional named axis (``shard_map``) over which the vocabulary is split
      (vocabulary / tensor parallelism): member ``r`` of ``k`` holds the contiguous slice
      ``[r * V / k, (r + 1) * V / k)`` of the classes, i.e. ``kernel`` is its ``(H, V / k)``
      slice of the columns and ``bias`` its ``(V / k,)`` slice (``in_specs``
      ``P(None, "model")`` and ``P("model")``); ``hidden`` and ``labels`` (global class
      ids) are the same on every member, and a ``(V,)`` ``alpha`` or ``gamma`` is the whole
      vector. Only per-row statistics cross the axis, once per call ((N,)-sized ``pmax`` and
      ``psum``), never logits. Every member returns the loss of the whole rows; ``jax.grad``
      gives each member the gradient of its own ``kernel`` and ``bias`` slices, and as the
      gradient w.r.t. ``hidden`` its own contribution (the sum over its classes), which is to
      be ``lax.psum``-ed over ``class_axis_name`` (Megatron's column-parallel backward).
      With ``hidden`` replicated over that axis under ``check_vma=True`` (shard_map's
      default), JAX does that ``psum`` itself: the transpose of the implicit broadcast of
      ``hidden`` to the members sums their contributions, both for ``jax.grad`` inside the
      body and outside a ``shard_map`` with ``hidden`` replicated, so the gradient that comes
      out is already whole (``psum`` it again and it is ``k`` times too big). Sum it yourself
      where ``hidden`` varies over the axis (``check_vma=False``, or ``hidden`` produced per
      member). Combines with ``axis_name`` on a 2-D (data x class) mesh.

  No rows (``N = 0``) give an empty (or 0) loss and zero gradients. Non-finite logits follow
  ``softmax_focal``; a masked row's features add exactly 0 to every gradient, even if they
  are NaN.

  Returns:
    Losses in the dtype of ``hidden @ kernel``: shape ``hidden.shape[:-1]`` for
    ``reduction="none"``, else a scalar.

  Raises:
    TypeError: non-floating ``hidden``, ``kernel`` or ``bias``; non-integer ``labels``; a
      keyword of the wrong type (e.g. ``chunk_size``).
    ValueError: ``kernel`` not ``(H, V)`` with ``H = hidden.shape[-1]``, or with ``V = 0``;
      ``bias`` not ``(V,)``; ``labels``, ``where`` or ``sample_weight`` of the wrong shape;
      ``chunk_size < 1``; and every check of ``softmax_focal`` (gamma, alpha, sample_weight,
      label_smoothing, reduction). At trace time.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import focal_jax
    >>> hidden = jnp.ones((6, 4)) / 4
    >>> kernel = jnp.arange(4 * 10, dtype=jnp.float32).reshape(4, 10) / 40
    >>> labels = jnp.array([0, 1, 2, 3, 4, 9])
    >>> loss = focal_jax.linear_softmax_focal(hidden, kernel, labels, chunk_size=4,
    ...                                       reduction="mean")
    >>> ref = focal_jax.softmax_focal(hidden @ kernel, labels, reduction="mean")
    >>> print(f"{loss:.5f} {ref:.5f}")
    1.90903 1.90903

  References:
    Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_,
    ICCV 2017. Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
    <https://arxiv.org/abs/2411.09009>`_, 2024 (the fused, chunked idea for cross-entropy).
  """
  fn = "linear_softmax_focal"
  hidden = _checks.floating_array(fn, "hidden", hidden)
  kernel = _checks.floating_array(fn, "kernel", kernel)
  if hidden.ndim < 1:
    raise ValueError(f"{fn}: hidden must have shape (..., H), got a scalar")
  size = hidden.shape[-1]
  if kernel.ndim != 2 or kernel.shape[0] != size:
    raise ValueError(
        f"{fn}: kernel must have shape (H, V) with H = {size} (the last axis of hidden "
        f"{hidden.shape}), got shape {kernel.shape}")
  # No shape in the message: the kernel is (H, V) here and torch's weight (V, H).
  vocab = _checks.num_classes(fn, "kernel", kernel.shape[1], "V = 0")
  split = _checks.class_split(fn, class_axis_name, axis_name, vocab)
  if split is not None:  # alpha and gamma are the whole (V,) vectors
    for arg, value in (("alpha", alpha), ("gamma", gamma)):
      _checks.split_class_vector(fn, arg, value, split, "columns of kernel")
  if bias is not None:
    bias = _checks.floating_array(fn, "bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(
          f"{fn}: bias must have shape ({vocab},) (V, the last axis of kernel {kernel.shape}), "
          f"got shape {bias.shape}")
  if chunk_size is not None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
      raise TypeError(
          f"{fn}: chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
      raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size}")
  row_shape = hidden.shape[:-1]
  dtype = jnp.result_type(hidden.dtype, kernel.dtype)
  prep = _softmax.prepare_labels(
      fn, labels, vocab if split is None else split.num_classes, row_shape, dtype, alpha=alpha,
      gamma=gamma, label_smoothing=label_smoothing, where=where, ignore_index=ignore_index,
      reduction=reduction, background_class=background_class,
      what_rows=f"the shape of hidden {hidden.shape} without its last axis",
      sample_weight=sample_weight)

  num_rows = math.prod(row_shape)
  if num_rows == 0:  # no rows: no loss, and zero gradients (nothing to scan over)
    loss = jnp.zeros(row_shape, prep.compute_dtype)
    return _reduce.reduce_loss(loss, valid=prep.valid, positive=prep.positive,
                               reduction=prep.reduction, axis_name=axis_name, dtype=prep.dtype)
  chunk = int(chunk_size) if chunk_size is not None else _auto_chunk(num_rows, vocab)
  chunk = min(chunk, max(num_rows, 1))
  padded = -(-num_rows // chunk) * chunk
  pad = padded - num_rows

  def rows(x, fill):
    x = x.reshape((num_rows,) + x.shape[len(row_shape):])
    if pad:  # padding rows are masked: 0 loss, 0 gradient, in no denominator
      x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x

  options = LinearOptions(label_smoothing=prep.eps, chunk_size=chunk,
                          tile=_auto_tile(padded, vocab, size, chunk), split=split,
                          compute_dtype=prep.compute_dtype)
  loss = _linear_rows(
      rows(hidden, 0), kernel, bias, rows(prep.t, 0), rows(prep.alpha, 1), rows(prep.gamma, 0),
      rows(prep.valid, False), rows(prep.in_range, True), options)
  loss = loss[:num_rows].reshape(row_shape)
  loss = _checks.apply_sample_weight(loss, prep.weight, prep.valid)
  return _reduce.reduce_loss(loss, valid=prep.valid, positive=prep.positive,
                             reduction=prep.reduction, axis_name=axis_name, dtype=prep.dtype)
